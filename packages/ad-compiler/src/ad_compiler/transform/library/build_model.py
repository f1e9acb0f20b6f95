"""build_model (stage factory): the factory's model on the meta device, replacing the placeholder module."""

from typing import Any

import torch.nn as nn

from ...errors import CompileError
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


@TransformRegistry.register("build_model")
class BuildModel(BaseTransform):
    """Before: an empty placeholder module.  After: `factory.build_model("meta")` (no weights yet)."""

    def _apply(self, mod: nn.Module, cm: Any, factory: Any, shared_config: SharedConfig) -> tuple[nn.Module, TransformInfo]:
        if factory is None:
            raise CompileError("build_model needs a model factory (InferenceOptimizer(factory, ...))")
        return factory.build_model("meta"), TransformInfo(num_matches=1)
