"""Transform base class and registry: bookkeeping done once for every graph transform."""

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.nn as nn
from ad_config.transform_config import Stage, TransformConfig, transform_config_class
from pydantic import BaseModel
from torch.fx import GraphModule

from ..errors import CompileError
from ..models.factory import ModelFactory
from ..registry import Registry
from ..utils.graph_utils import canonicalize_graph, run_shape_prop
from .cache_protocol import CacheInterface

logger = logging.getLogger(__name__)


@dataclass
class SharedConfig:
    """Facts every transform may read: where we run and how many ranks share the model."""

    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    # Anything a caller wants to hand to transforms (e.g. max_batch_size, max_seq_len).
    extras: dict[str, Any] = field(default_factory=dict)


class TransformInfo(BaseModel):
    """What one transform did; kept in the optimizer's history and written to report.json."""

    name: str = ""
    stage: str = ""
    skipped: bool = False
    num_matches: int = 0
    is_clean: bool = False
    has_valid_shapes: bool = False
    seconds: float = 0.0
    error: str | None = None
    reason: str | None = None  # why it was skipped, when it was


@dataclass
class _GraphState:
    """Whether a GraphModule is canonical and its shape metadata current. A transform that reports matches has
    changed the graph (both become stale); one that matched nothing left it as it was, so the next transform
    need not canonicalise or propagate shapes again. A graph seen for the first time is treated as stale."""

    clean: bool = False
    shapes_valid: bool = False

    @staticmethod
    def of(gm: GraphModule) -> "_GraphState":
        state = gm.meta.get("ad_graph_state")
        if not isinstance(state, _GraphState):
            state = gm.meta["ad_graph_state"] = _GraphState()
        return state


class BaseTransform(ABC):
    """A graph transform. Subclasses implement `_apply` only.

    `mod` is an `nn.Module` before export (stages factory/export) and a `GraphModule` after.
    `cm` is the runtime's cached-sequence interface (None when only compiling; see cache_protocol).
    """

    config_class: ClassVar[type[TransformConfig] | None] = None  # defaults to the ad_config model
    registry_key: ClassVar[str] = ""

    def __init__(self, config: TransformConfig | dict | None = None):
        cfg_cls = self.get_config_class()
        if config is None:
            config = cfg_cls()
        elif isinstance(config, dict):
            config = cfg_cls.model_validate(config)
        self.config = config

    @classmethod
    def get_config_class(cls) -> type[TransformConfig]:
        return cls.config_class or transform_config_class(cls.registry_key)

    def __call__(
        self,
        mod: nn.Module,
        cm: CacheInterface | None = None,
        factory: ModelFactory | None = None,
        shared_config: SharedConfig | None = None,
        history: dict[str, TransformInfo] | None = None,
    ) -> nn.Module:
        shared_config = shared_config or SharedConfig()
        name, stage = self.registry_key, Stage(self.config.stage).value
        info = TransformInfo(name=name, stage=stage)
        if not self.config.enabled:
            info.skipped, info.reason = True, "disabled"
            self._record(history, info, mod)
            return mod
        start = time.perf_counter()
        try:
            if isinstance(mod, GraphModule):
                # Only when the graph changed since it was last cleaned / shape-propagated (see _GraphState).
                state = _GraphState.of(mod)
                if self.config.requires_clean_graph and not state.clean:
                    canonicalize_graph(mod)
                    state.clean = True
                if self.config.requires_shape_prop and not state.shapes_valid:
                    run_shape_prop(mod)
                    state.shapes_valid = True
            mod, applied = self._apply(mod, cm, factory, shared_config)
            info.num_matches, info.skipped, info.reason = applied.num_matches, applied.skipped, applied.reason
            if isinstance(mod, GraphModule) and not applied.skipped:
                state = _GraphState.of(mod)
                if applied.num_matches > 0:
                    state.clean = state.shapes_valid = False
                if self.config.run_graph_cleanup and applied.num_matches > 0:
                    canonicalize_graph(mod)
                    state.clean = info.is_clean = True
                if self.config.run_shape_prop and not state.shapes_valid:
                    run_shape_prop(mod)
                    state.shapes_valid = True
                info.has_valid_shapes = state.shapes_valid
        except Exception as e:  # noqa: BLE001 - re-raised with context or skipped on request
            if isinstance(mod, GraphModule):
                _GraphState.of(mod).clean = _GraphState.of(mod).shapes_valid = False  # maybe half an edit left
            info.error = f"{type(e).__name__}: {e}"
            if not self.config.skip_on_error:
                info.seconds = time.perf_counter() - start
                self._record(history, info, mod)
                if isinstance(e, CompileError):
                    raise
                raise CompileError(f"transform {name!r} (stage {stage}) failed: {info.error}") from e
            logger.warning("transform %s failed and was skipped (skip_on_error): %s", name, info.error)
            info.skipped, info.reason = True, "error"
        info.seconds = time.perf_counter() - start
        self._record(history, info, mod)
        logger.debug("[%s] %s: %d matches in %.2fs", stage, name, info.num_matches, info.seconds)
        return mod

    def _record(self, history: dict[str, TransformInfo] | None, info: TransformInfo, mod: nn.Module) -> None:
        if history is not None:
            history[self.registry_key] = info
        # Keep the history on the module too so later stages and reports can read it.
        if isinstance(mod, nn.Module):
            hist = getattr(mod, "_transform_history", None)
            if hist is None:
                hist = {}
                try:
                    object.__setattr__(mod, "_transform_history", hist)
                except Exception:  # noqa: BLE001
                    return
            hist[self.registry_key] = info

    @abstractmethod
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        """Rewrite `mod`; return it with what was done (num_matches, or skipped with a reason)."""


def _provided_by_runtime(name: str) -> str | None:
    """For a transform of the cache_init or compile stage: which package provides it."""
    try:
        stage = transform_config_class(name)().stage
    except Exception:  # noqa: BLE001 - no config by that name: no hint
        return None
    if Stage(stage).order >= Stage.CACHE_INIT.order:
        return "it is provided by ad-runtime: install it"
    return None


# Transforms by name; `TransformRegistry.register(name)` is the decorator every transform class uses, and tells the
# class its name.
TransformRegistry: Registry[type[BaseTransform]] = Registry(
    "transform", on_register=lambda name, cls: setattr(cls, "registry_key", name), missing_hint=_provided_by_runtime)


__all__ = ["BaseTransform", "SharedConfig", "TransformInfo", "TransformRegistry"]
