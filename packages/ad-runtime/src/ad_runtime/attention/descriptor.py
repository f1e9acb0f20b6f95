"""The attention-backend contract: what a paged cached-attention backend declares to insert_cached_attention."""

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.fx import Node

# Metadata a backend may ask for, by name; SequenceInfo provides every one (see docs/contracts.md).
# Device tensors unless the name ends in `_host` (CPU tensors: reading them never syncs the GPU).
METADATA_NAMES: tuple[str, ...] = (
    "batch_info_host",  # int32 [3] on CPU: num_prefill, num_prefill_tokens, num_decode
    "seq_len",  # int32 [B] new tokens per sequence this step
    "input_pos",  # int32 [B] tokens already in the cache before this step
    "cu_seqlen",  # int32 [B+1] prefix sums of seq_len (token offsets into the flat batch)
    "page_table",  # int32 [B, max_pages_per_seq] page ids, unused entries -1
    "slot_mapping",  # int64 [T] cache slot of each new token: page * page_size + offset
    "batch_indices",  # int32 [T] sequence index of each new token
    "cu_num_pages",  # int32 [B+1] prefix sums of pages in use after this step (flashinfer kv_indptr)
    "page_indices",  # int32 [max_batch_size * max_pages_per_seq] used pages of all sequences, packed; valid up to cu_num_pages[B]
    "last_page_len",  # int32 [B] tokens in each sequence's last page after this step (1..page_size)
    "seq_len_host",  # int32 [B] on CPU
    "input_pos_host",  # int32 [B] on CPU
    "cu_seqlen_host",  # int32 [B+1] on CPU
    "slot_idx",  # int64 [B] each sequence's row in the per-sequence state caches (padding rows: max_batch_size)
    "slot_idx_host",  # int64 [B] on CPU
)


@dataclass(frozen=True)
class CacheSpec:
    """One per-layer cache tensor: allocated as [num_cache_pages, page_size, n_kv_heads, head_dim]."""

    n_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # the model's dtype; the cache interface may override it with kv_cache_dtype


@dataclass(frozen=True)
class PrepareMetadata:
    """An op run once per forward (inserted after the placeholders) that derives backend metadata.

    Called as `op(*[metadata by name in arg_names])`; it returns a tuple of `num_outputs` tensors
    which are passed to every cached-attention call right after the metadata.
    """

    op: Any  # an OpOverload / OpOverloadPacket
    arg_names: tuple[str, ...]
    num_outputs: int


@dataclass(frozen=True)
class AttentionConstants:
    """The per-layer constants of a source torch_attention node, passed last to the cached op."""

    scale: float | None
    sliding_window: int | None
    logit_cap: float | None


class AttentionDescriptor(ABC):
    """A cached paged-attention backend. Subclasses are registered with `AttentionRegistry.register`.

    insert_cached_attention replaces each `torch_attention(q, k, v, ..., layout="bsnd")` node by

        cached_op(q, k, v,                       # [1, T, n_heads, d], [1, T, n_kv, d], [1, T, n_kv, d_v]
                  *metadata,                      # placeholders named by metadata_names(), in that order
                  *prepared,                      # outputs of prepare_metadata(), if any
                  *caches,                        # this layer's caches, in cache_specs() order
                  sinks,                          # Tensor [n_heads] or None
                  scale, sliding_window, logit_cap)  # float | None, int | None, float | None
        -> Tensor [1, T, n_heads, d_v]

    The op writes the step's new k/v into the caches (slot of token t: page_table[b, pos // page_size],
    offset pos % page_size, with pos = input_pos[b] + t - cu_seqlen[b]) and then attends over the
    cache: token t sees positions <= pos (and > pos - sliding_window when set). Sequences are ordered
    prefills first (seq_len > 1), then decodes (seq_len == 1). It must be registered with
    `mutates_args` naming the caches, and have a fake implementation.
    """

    name: ClassVar[str] = ""

    @classmethod
    def layout(cls) -> str:
        """Layout of q/k/v the cached op takes; only "bsnd" is used today."""
        return "bsnd"

    @classmethod
    def source_op(cls) -> Any:
        """The canonical op this backend replaces."""
        return torch.ops.auto_deploy.torch_attention

    @classmethod
    @abstractmethod
    def cached_op(cls) -> Any:
        """The cached attention op (an OpOverload) with the signature in the class docstring."""

    @classmethod
    @abstractmethod
    def metadata_names(cls) -> tuple[str, ...]:
        """The metadata the cached op takes, a subset of METADATA_NAMES in argument order."""

    @classmethod
    def prepare_metadata(cls) -> PrepareMetadata | None:
        """An optional in-graph op deriving backend metadata once per forward."""
        return None

    @classmethod
    def cache_specs(cls, source_node: Node) -> dict[str, CacheSpec]:
        """Caches one layer needs, by name; default: paged k and v caches in the NHD page layout."""
        args = source_op_args(source_node)
        k, v = args["key"].meta["val"], args["value"].meta["val"]
        if args.get("layout", "bnsd") == "bnsd":  # [b, n_kv, s, d] -> [b, s, n_kv, d]
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        return {
            "k_cache": CacheSpec(n_kv_heads=k.shape[2], head_dim=k.shape[3], dtype=k.dtype),
            "v_cache": CacheSpec(n_kv_heads=v.shape[2], head_dim=v.shape[3], dtype=v.dtype),
        }

    @classmethod
    def host_prepare(cls, info: Any) -> None:
        """Called by the cache interface after each step's metadata reached the device, outside any
        CUDA graph (e.g. flashinfer's `plan`). `info` is the SequenceInfo. Default: nothing."""
        return None

    @classmethod
    def on_cache_init(cls, caches: dict[str, torch.Tensor]) -> None:
        """Called after the cache tensors were (re)allocated (e.g. to size workspaces). Default: nothing."""
        return None


_SOURCE_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "sinks",
                     "sliding_window", "logit_cap", "layout")


def source_op_args(source_node: Node) -> dict[str, Any]:
    """A torch_attention node's arguments by name (positional and keyword; absent ones omitted)."""
    args = dict(zip(_SOURCE_ARG_NAMES, source_node.args))
    args.update(source_node.kwargs)
    return args


def attention_constants(source_node: Node) -> AttentionConstants:
    """scale, sliding_window and logit_cap of a torch_attention node (args or kwargs, defaults None)."""
    args = source_op_args(source_node)
    window = args.get("sliding_window")
    # torch_attention treats a window <= 0 as "no window"; normalise so backends see None.
    window = window if window is not None and window > 0 else None
    return AttentionConstants(args.get("scale"), window, args.get("logit_cap"))


HostPrepare = Callable[[Any], None]

__all__ = [
    "METADATA_NAMES",
    "AttentionConstants",
    "AttentionDescriptor",
    "CacheSpec",
    "HostPrepare",
    "PrepareMetadata",
    "attention_constants",
    "source_op_args",
]
