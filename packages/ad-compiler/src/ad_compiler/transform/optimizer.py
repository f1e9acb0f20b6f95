"""The pipeline: run the configured transforms in stage order, then YAML order within a stage."""

import logging
from typing import Any

import torch.nn as nn
from ad_config.transform_config import Stage, TransformConfig, parse_transforms

from .interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

logger = logging.getLogger(__name__)


def ordered_transforms(configs: dict[str, TransformConfig]) -> list[tuple[str, TransformConfig]]:
    """Sort by stage; Python's sort is stable, so within a stage the mapping's order is kept."""
    items = list(configs.items())
    return sorted(items, key=lambda kv: Stage(kv[1].stage).order)


class InferenceOptimizer:
    """Apply a transforms mapping (as in default.yaml) to a model built by `factory`."""

    def __init__(self, factory: Any, config: dict[str, TransformConfig | dict]):
        self.factory = factory
        self.config = parse_transforms(
            {k: (v.model_dump() if isinstance(v, TransformConfig) else v) for k, v in config.items()}
        )
        self.history: dict[str, TransformInfo] = {}

    def __call__(
        self,
        cm: Any = None,
        mod: nn.Module | None = None,
        shared_config: SharedConfig | None = None,
        until: str | Stage | None = None,
        progress: Any = None,
    ) -> nn.Module:
        """Run every transform up to and including stage `until` (all stages when None)."""
        shared_config = shared_config or SharedConfig()
        last = Stage(until).order if until is not None else len(Stage) - 1
        mod = mod if mod is not None else nn.Module()  # build_model replaces this placeholder
        for name, cfg in ordered_transforms(self.config):
            if Stage(cfg.stage).order > last:
                continue
            transform: BaseTransform = TransformRegistry.get(name)(cfg)
            if progress is not None:
                progress(name, cfg)
            mod = transform(mod, cm, self.factory, shared_config, self.history)
        return mod
