"""The base of the runtime transforms that rewrite the exported graph: the checks each made before its rewrite."""

from abc import abstractmethod
from typing import ClassVar

import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.models.factory import ModelFactory
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo
from torch.fx import GraphModule

from ..kv_cache.interface import CachedSequenceInterface


class GraphTransform(BaseTransform):
    """A transform of the exported GraphModule: `_rewrite(gm, cm)` runs once both are checked, cm being the
    runtime's CachedSequenceInterface unless `needs_cm` is False (then cm as given, maybe None)."""

    needs_cm: ClassVar[bool] = True

    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if self.needs_cm and not isinstance(cm, CachedSequenceInterface):
            raise CompileError(f"{self.registry_key} needs the runtime's CachedSequenceInterface (cm)")
        if not isinstance(mod, GraphModule):
            raise CompileError(f"{self.registry_key} needs an exported GraphModule")
        return self._rewrite(mod, cm)

    @abstractmethod
    def _rewrite(self, gm: GraphModule, cm: CachedSequenceInterface) -> tuple[nn.Module, TransformInfo]:
        """Rewrite `gm`; return it with what was done (num_matches, or skipped with a reason)."""
