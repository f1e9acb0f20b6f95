"""resize_kv_cache: on a GPU, give the KV cache `free_mem_ratio` of the memory a full forward leaves free.

The graph is unchanged; the cm's caches are re-allocated with the new page count (min over ranks).
"""

import logging

import torch
import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.models.factory import ModelFactory
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

from ...device import free_and_total_memory, min_over_ranks
from ...kv_cache.interface import CachedSequenceInterface, StepSequence
from ...memory_plan import pages_that_fit

logger = logging.getLogger(__name__)


def _largest_batch(cm: CachedSequenceInterface) -> list[StepSequence]:
    """Prefills filling max_num_tokens; pages reused cyclically (their contents do not matter here), one state
    row each (a graph with per-sequence state refuses sequences without one)."""
    info, left, seqs, page = cm.info, cm.info.max_num_tokens, [], 0
    while left > 0 and len(seqs) < info.max_batch_size:
        n = min(left, info.max_seq_len)
        npages = -(-n // info.page_size)
        seqs.append(StepSequence([0] * n, 0, [(page + i) % cm.num_pages for i in range(npages)], slot=len(seqs)))
        page, left = page + npages, left - n
    # prefills first: a 1-token remainder would be a decode and must go last
    return sorted(seqs, key=lambda s: len(s.token_ids) == 1)


def measure_activation_bytes(mod: nn.Module, cm: CachedSequenceInterface) -> int:
    """Peak memory a forward at max_num_tokens allocates beyond what was allocated before it."""
    device = cm.device
    cm.update(_largest_batch(cm))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        out = mod(**cm.named_args)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak - before


@TransformRegistry.register("resize_kv_cache")
class ResizeKvCache(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if not isinstance(cm, CachedSequenceInterface):
            raise CompileError("resize_kv_cache needs the runtime's CachedSequenceInterface (cm)")
        if cm.device.type != "cuda":
            return mod, TransformInfo(skipped=True, reason="not a CUDA device: the cache keeps its configured size")
        if not cm.caches:
            return mod, TransformInfo(skipped=True, reason="no caches allocated (run initialize_cache first)")
        if not cm.cache_specs:
            return mod, TransformInfo(skipped=True, reason="no paged KV caches (state caches keep their size)")
        activations = measure_activation_bytes(mod, cm)
        cache_bytes = sum(t.numel() * t.element_size() for t in cm.caches.values())
        free, total = free_and_total_memory(cm.device)
        # The current caches are given back before re-allocating, so they count as available.
        # State caches are re-allocated at the same size: what they take is not available to pages.
        available = free + cache_bytes - activations - cm.state_bytes()
        num_pages = pages_that_fit(available, self.config.free_mem_ratio, cm.bytes_per_page(),
                                   getattr(cm, "max_num_pages", None))
        num_pages = min_over_ranks(num_pages, cm.device)
        if num_pages < cm.info.max_pages_per_seq:
            raise CompileError(
                f"only {num_pages} KV-cache pages fit (activations {activations / 2**20:.0f} MiB, free "
                f"{free / 2**20:.0f} MiB of {total / 2**20:.0f} MiB), fewer than one sequence of max_seq_len "
                f"needs ({cm.info.max_pages_per_seq}); lower max_num_tokens/max_seq_len or raise free_mem_ratio"
            )
        logger.info(
            "resize_kv_cache: %d -> %d pages (activations %.0f MiB, free %.0f MiB, ratio %.2f)",
            cm.num_pages, num_pages, activations / 2**20, (free + cache_bytes) / 2**20, self.config.free_mem_ratio,
        )
        cm.initialize_caches(num_pages)
        return mod, TransformInfo(num_matches=1)
