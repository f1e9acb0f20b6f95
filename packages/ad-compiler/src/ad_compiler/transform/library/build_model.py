"""build_model (stage factory): the factory's model on the meta device, replacing the placeholder module."""

import torch.nn as nn

from ...errors import CompileError
from ...models.factory import ModelFactory
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


@TransformRegistry.register("build_model")
class BuildModel(BaseTransform):
    """Before: an empty placeholder module.  After: `factory.build_model("meta")` (no weights yet)."""

    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if factory is None:
            raise CompileError("build_model needs a model factory (InferenceOptimizer(factory, ...))")
        return factory.build_model("meta"), TransformInfo(num_matches=1)
