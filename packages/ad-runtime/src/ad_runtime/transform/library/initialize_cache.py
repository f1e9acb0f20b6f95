"""initialize_cache: allocate the paged caches that insert_cached_attention registered on the cm.

The graph is unchanged; its cache inputs get tensors of [num_pages + 1, page_size, n_kv_heads, head_dim], its
per-sequence state inputs (Mamba conv/SSM state) tensors of [max_batch_size + 1, *state shape].

num_pages defaults to max_batch_size sequences of max_seq_len. On a GPU that may be more than the card holds
(256 x 8,232 tokens of Llama-3.1-8B: 276 GB); the first allocation then takes what fits in half the free memory
(the other half holds the forward resize_kv_cache runs to measure activations), and resize_kv_cache sizes it.
"""

import logging

import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.models.factory import ModelFactory
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

from ...device import free_and_total_memory, min_over_ranks
from ...kv_cache.interface import CachedSequenceInterface

logger = logging.getLogger(__name__)

# Share of the free GPU memory the first allocation may take; resize_kv_cache's forward needs the rest.
FIRST_ALLOCATION_SHARE = 0.5


def first_pages(configured: int, bytes_per_page: int, free_bytes: int, min_pages: int) -> int:
    """Pages of the first allocation on a GPU: the configured count where it fits in FIRST_ALLOCATION_SHARE of
    the free memory (with the scratch page), else as many as fit; CompileError when not even one sequence of
    max_seq_len (`min_pages`) fits."""
    fit = int(FIRST_ALLOCATION_SHARE * free_bytes) // bytes_per_page - 1
    if fit >= configured:
        return configured
    if fit < min_pages:
        raise CompileError(
            f"the KV cache cannot hold one sequence of max_seq_len ({min_pages} pages of {bytes_per_page} bytes) in "
            f"half of the {free_bytes / 2**30:.1f} GiB free on the GPU; lower max_seq_len"
        )
    return fit


@TransformRegistry.register("initialize_cache")
class InitializeCache(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if not isinstance(cm, CachedSequenceInterface):
            raise CompileError("initialize_cache needs the runtime's CachedSequenceInterface (cm)")
        if not cm.cache_specs and not cm.state_specs:
            return mod, TransformInfo(skipped=True, reason="no caches registered (run insert_cached_attention)")
        num_pages = None
        if cm.device.type == "cuda" and cm.cache_specs:
            free, _ = free_and_total_memory(cm.device)
            pages = min_over_ranks(first_pages(cm.num_pages, cm.bytes_per_page(), free, cm.info.max_pages_per_seq),
                                   cm.device)
            if pages < cm.num_pages:
                logger.info("initialize_cache: max_batch_size x max_seq_len needs %d KV pages (%.1f GiB), more than "
                            "fits; allocating %d until resize_kv_cache sizes the cache", cm.num_pages,
                            cm.num_pages * cm.bytes_per_page() / 2**30, pages)
                num_pages = pages
        cm.initialize_caches(num_pages)
        return mod, TransformInfo(num_matches=len(cm.caches))
