"""The pipeline: run the configured transforms in stage order, then YAML order within a stage."""

from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from ad_config.transform_config import Stage, TransformConfig, parse_transforms

from ..models.factory import ModelFactory
from .cache_protocol import CacheInterface
from .interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


def ordered_transforms(configs: dict[str, TransformConfig]) -> list[tuple[str, TransformConfig]]:
    """Sort by stage; Python's sort is stable, so within a stage the mapping's order is kept."""
    return sorted(configs.items(), key=lambda kv: Stage(kv[1].stage).order)


class InferenceOptimizer:
    """Apply a transforms mapping (as in default.yaml) to a model built by `factory`."""

    def __init__(self, factory: ModelFactory | None, config: dict[str, TransformConfig | dict]):
        self.factory = factory
        self.config = parse_transforms(
            {k: (v.model_dump() if isinstance(v, TransformConfig) else v) for k, v in config.items()}
        )
        self.history: dict[str, TransformInfo] = {}

    def __call__(
        self,
        cm: CacheInterface | None = None,
        mod: nn.Module | None = None,
        shared_config: SharedConfig | None = None,
        until: str | Stage | None = None,
        progress: Any = None,
        after: str | Stage | None = None,
        skip: Mapping[str, str] | None = None,
    ) -> nn.Module:
        """Run every transform of the stages after `after` (from the first when None) up to and including
        `until` (the last when None). `skip`: transform name -> why it is not run; recorded as skipped."""
        shared_config = shared_config or SharedConfig()
        first = Stage(after).order + 1 if after is not None else 0
        last = Stage(until).order if until is not None else len(Stage) - 1
        mod = mod if mod is not None else nn.Module()  # build_model replaces this placeholder
        for name, cfg in self.selected(first, last):
            transform: BaseTransform = TransformRegistry.get(name)(cfg)
            if progress is not None:
                progress(name, cfg)
            if skip and name in skip:
                info = TransformInfo(name=name, stage=Stage(cfg.stage).value, skipped=True, reason=skip[name])
                transform._record(self.history, info, mod)
                continue
            mod = transform(mod, cm, self.factory, shared_config, self.history)
        return mod

    def selected(self, first: int = 0, last: int = len(Stage) - 1) -> list[tuple[str, TransformConfig]]:
        """The configured transforms whose stage order lies in [first, last], in running order."""
        return [(n, c) for n, c in ordered_transforms(self.config) if first <= Stage(c.stage).order <= last]
