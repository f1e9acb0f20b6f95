"""initialize_cache: allocate the paged caches that insert_cached_attention registered on the cm.

The graph is unchanged; its cache inputs get tensors of [num_pages + 1, page_size, n_kv_heads, head_dim], its
per-sequence state inputs (Mamba conv/SSM state) tensors of [max_batch_size + 1, *state shape].

num_pages defaults to max_batch_size sequences of max_seq_len, which may be more than the device holds (256 x 8,232
tokens of Llama-3.1-8B: 276 GB; 96 x 8,192 of the bundled SmolLM2 on a 24 GB host: 35 GB). The allocation then
takes what fits in half the free memory (memory_plan.first_kv_pages; a CPU's free memory shared by its ranks): on a
GPU resize_kv_cache sizes the cache after that, on a CPU that is the cache, and requests wait for pages (said in a
warning). Not one sequence of max_seq_len fitting is an error.
"""

import logging

import torch
import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.models.factory import ModelFactory
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

from ...device import free_and_total_memory, min_over_ranks
from ...kv_cache.interface import CachedSequenceInterface
from ...memory_plan import device_free_bytes, first_kv_pages, host_ranks

logger = logging.getLogger(__name__)


def free_for_caches(device: torch.device) -> int | None:
    """Free bytes the first allocation plans with (None where the device does not say)."""
    if device.type == "cuda":
        return free_and_total_memory(device)[0]
    free = device_free_bytes(device)
    return None if free is None else free // host_ranks()


def first_pages(cm: CachedSequenceInterface) -> int:
    """The pages to allocate first: first_kv_pages of the free memory, the same on every rank."""
    free = free_for_caches(cm.device)
    pages = cm.num_pages if free is None else first_kv_pages(cm.num_pages, cm.bytes_per_page(), free)
    pages = min_over_ranks(pages, cm.device)
    if pages < min(cm.num_pages, cm.info.max_pages_per_seq):  # the memory, not the configuration, is short
        raise CompileError(
            f"the KV cache cannot hold one sequence of max_seq_len ({cm.info.max_pages_per_seq} pages of "
            f"{cm.bytes_per_page()} bytes) in half of the {free / 2**30:.1f} GiB free on {cm.device}; lower "
            "max_seq_len or kv_cache_dtype"
        )
    return pages


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
        if cm.cache_specs:
            pages = first_pages(cm)
            if pages < cm.num_pages:
                gib = cm.num_pages * cm.bytes_per_page() / 2**30
                if cm.device.type == "cuda":
                    logger.info("initialize_cache: max_batch_size x max_seq_len needs %d KV pages (%.1f GiB), more "
                                "than fits; allocating %d until resize_kv_cache sizes the cache", cm.num_pages, gib,
                                pages)
                else:
                    logger.warning("KV cache: %d pages (half the free memory) where max_batch_size x max_seq_len "
                                   "needs %d (%.1f GiB); requests wait for pages when they run out", pages,
                                   cm.num_pages, gib)
                num_pages = pages
        cm.initialize_caches(num_pages)
        return mod, TransformInfo(num_matches=len(cm.caches))
