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
from ..utils.graph_utils import canonicalize_graph, run_shape_prop

logger = logging.getLogger(__name__)


# gm.meta key: True while the graph is as canonicalize_graph left it. A transform that reports matches changes the
# graph (0 matches means no change: the contract of `_apply`), so it clears the mark unless it cleans up itself;
# then the next transform that needs a clean graph canonicalises it, and one whose predecessor left it clean does not.
CLEAN_META_KEY = "ad_graph_is_clean"


def _canonicalize(gm: GraphModule) -> None:
    canonicalize_graph(gm)
    gm.meta[CLEAN_META_KEY] = True


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


class BaseTransform(ABC):
    """A graph transform. Subclasses implement `_apply` only.

    `mod` is an `nn.Module` before export (stages factory/export) and a `GraphModule` after.
    `cm` is the runtime's cached-sequence interface (None when only compiling).
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
        cm: Any = None,
        factory: Any = None,
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
                if self.config.requires_clean_graph and not mod.meta.get(CLEAN_META_KEY):
                    _canonicalize(mod)
                if self.config.requires_shape_prop:
                    run_shape_prop(mod)
            mod, applied = self._apply(mod, cm, factory, shared_config)
            info.num_matches = applied.num_matches
            info.skipped = applied.skipped
            info.reason = applied.reason
            if isinstance(mod, GraphModule) and not applied.skipped:
                if self.config.run_graph_cleanup and applied.num_matches > 0:
                    _canonicalize(mod)
                    info.is_clean = True
                elif applied.num_matches > 0:
                    mod.meta[CLEAN_META_KEY] = False
                if self.config.run_shape_prop:
                    run_shape_prop(mod)
                    info.has_valid_shapes = True
        except Exception as e:  # noqa: BLE001 - re-raised with context or skipped on request
            if isinstance(mod, GraphModule):
                mod.meta[CLEAN_META_KEY] = False  # a failed transform may have left half an edit behind
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
        self, mod: nn.Module, cm: Any, factory: Any, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        """Rewrite `mod`; return it with what was done (num_matches, or skipped with a reason)."""


class TransformRegistry:
    """Transforms by name; `register(name)` is the decorator every transform class uses."""

    _registry: ClassVar[dict[str, type[BaseTransform]]] = {}

    @classmethod
    def register(cls, name: str):
        def wrap(t: type[BaseTransform]) -> type[BaseTransform]:
            if name in cls._registry and cls._registry[name] is not t:
                raise ValueError(f"transform {name!r} registered twice")
            t.registry_key = name
            cls._registry[name] = t
            return t

        return wrap

    @classmethod
    def get(cls, name: str) -> type[BaseTransform]:
        from . import library  # noqa: F401 - registers every built-in transform

        if name not in cls._registry:
            from ad_config.transform_config import closest_name

            hint = closest_name(name, sorted(cls._registry))
            runtime_hint = ""
            try:
                transform_config_class(name)
                stage = transform_config_class(name)().stage
                if Stage(stage).order >= Stage.CACHE_INIT.order:
                    runtime_hint = " (it is provided by ad-runtime: install it and `import ad_runtime`)"
            except Exception:  # noqa: BLE001
                pass
            extra = f" (did you mean {hint!r}?)" if hint and not runtime_hint else ""
            raise CompileError(f"no transform registered as {name!r}{runtime_hint}{extra}")
        return cls._registry[name]

    @classmethod
    def has(cls, name: str) -> bool:
        from . import library  # noqa: F401

        return name in cls._registry

    @classmethod
    def names(cls) -> list[str]:
        from . import library  # noqa: F401

        return sorted(cls._registry)


__all__ = ["BaseTransform", "SharedConfig", "TransformInfo", "TransformRegistry"]
