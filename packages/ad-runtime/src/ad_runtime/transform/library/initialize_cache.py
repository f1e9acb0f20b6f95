"""initialize_cache: allocate the paged caches that insert_cached_attention registered on the cm.

The graph is unchanged; its cache inputs get tensors of [num_pages + 1, page_size, n_kv_heads, head_dim], its
per-sequence state inputs (Mamba conv/SSM state) tensors of [max_batch_size + 1, *state shape].
"""

import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.models.factory import ModelFactory
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

from ...kv_cache.interface import CachedSequenceInterface


@TransformRegistry.register("initialize_cache")
class InitializeCache(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if not isinstance(cm, CachedSequenceInterface):
            raise CompileError("initialize_cache needs the runtime's CachedSequenceInterface (cm)")
        if not cm.cache_specs and not cm.state_specs:
            return mod, TransformInfo(skipped=True, reason="no caches registered (run insert_cached_attention)")
        cm.initialize_caches()
        return mod, TransformInfo(num_matches=len(cm.caches))
