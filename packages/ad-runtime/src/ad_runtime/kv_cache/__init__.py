"""Paged KV cache: page bookkeeping, the flattened step metadata and the cache interface (`cm`)."""

from .interface import CachedSequenceInterface, StateSpec, StepSequence, parse_kv_cache_dtype
from .page_pool import OutOfPagesError, PagePool
from .sequence_info import SequenceInfo

__all__ = [
    "CachedSequenceInterface",
    "OutOfPagesError",
    "PagePool",
    "SequenceInfo",
    "StateSpec",
    "StepSequence",
    "parse_kv_cache_dtype",
]
