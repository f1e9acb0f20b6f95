"""CachedSequenceInterface (`cm`): the batch metadata, the page pool and the per-layer cache tensors."""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..attention.descriptor import AttentionDescriptor, CacheSpec
from .page_pool import PagePool
from .sequence_info import SequenceInfo

logger = logging.getLogger(__name__)

_KV_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
}


def parse_kv_cache_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """None / "auto" -> None (use the model's dtype); otherwise a torch dtype."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return None
    if value not in _KV_DTYPES:
        raise ValueError(f"kv_cache_dtype {value!r} not understood; use auto or one of {sorted(_KV_DTYPES)}")
    return _KV_DTYPES[value]


@dataclass(slots=True)
class StepSequence:
    """One sequence of a step: what the engine runs, the model runner feeds and `update` fills the metadata from."""

    token_ids: Sequence[int]  # tokens fed this step (whole prompt, a prompt chunk, or one token)
    input_pos: int  # tokens of this sequence already in the KV cache
    pages: Sequence[int]  # its page table (from `cm.pool`), enough for input_pos + len(token_ids)
    slot: int = -1  # its row in the per-sequence state caches (needed only when the graph has state caches)


@dataclass(frozen=True)
class StateSpec:
    """One per-layer, per-sequence state cache (Mamba conv or SSM state): allocated as [max_batch_size + 1, *shape]
    (the last row is the scratch row of padded CUDA-graph rows)."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class CachedSequenceInterface:
    """What the graph is called with and what it caches into.

    Lifecycle: created by the executor; `insert_cached_attention` registers caches and graph inputs;
    `initialize_cache` allocates the caches; `resize_kv_cache` may re-size them. Each step then:

        cm.pool.ensure_capacity(seq_id, num_cached + len(new_tokens))   # per scheduled sequence
        cm.update([StepSequence(new_tokens, num_cached, cm.pool.page_table(seq_id)), ...])
        logits = gm(**cm.named_args)                                       # [1, T, vocab]
        last = logits[0, cm.info.last_token_idx]                           # [B, vocab]
    """

    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        page_size: int = 64,
        max_num_tokens: int | None = None,
        num_pages: int | None = None,
        device: str | torch.device = "cpu",
        kv_cache_dtype: str | torch.dtype | None = "auto",
    ):
        self.device = torch.device(device)
        self.info = SequenceInfo(max_batch_size, max_seq_len, page_size, max_num_tokens, self.device)
        # Default: every sequence can reach max_seq_len at once (resize_kv_cache may change it).
        self.num_pages = num_pages or max_batch_size * self.info.max_pages_per_seq
        self.kv_cache_dtype = parse_kv_cache_dtype(kv_cache_dtype)
        self.pool = PagePool(self.num_pages, page_size)
        self.info.scratch_page = self.num_pages
        self.cache_specs: dict[str, CacheSpec] = {}
        self.state_specs: dict[str, StateSpec] = {}
        self.caches: dict[str, torch.Tensor] = {}
        self.metadata_names: list[str] = []  # metadata placeholders of the graph, in order
        self.attention_backends: list[type[AttentionDescriptor]] = []

    @property
    def page_size(self) -> int:
        return self.info.page_size

    # ---- set-up (called by transforms) -------------------------------------------------------------

    def add_cache(self, name: str, spec: CacheSpec) -> None:
        if name in self.cache_specs:
            raise ValueError(f"cache {name!r} added twice")
        self.cache_specs[name] = spec

    def add_state(self, name: str, spec: StateSpec) -> None:
        if name in self.cache_specs or name in self.state_specs:
            raise ValueError(f"cache {name!r} added twice")
        self.state_specs[name] = spec

    def state_bytes(self) -> int:
        """Bytes of all state caches (they do not grow with the page count)."""
        rows = self.info.max_batch_size + 1
        return sum(rows * math.prod(s.shape) * s.dtype.itemsize for s in self.state_specs.values())

    def add_metadata(self, name: str) -> None:
        if name not in self.metadata_names:
            self.metadata_names.append(name)

    def add_attention_backend(self, desc: type[AttentionDescriptor]) -> None:
        if desc not in self.attention_backends:
            self.attention_backends.append(desc)

    def cache_dtype(self, spec: CacheSpec) -> torch.dtype:
        return self.kv_cache_dtype or spec.dtype

    def bytes_per_page(self) -> int:
        """Bytes one page takes over all caches of all layers."""
        return sum(
            self.page_size * s.n_kv_heads * s.head_dim * self.cache_dtype(s).itemsize for s in self.cache_specs.values()
        )

    def initialize_caches(self, num_pages: int | None = None) -> int:
        """(Re)allocate every cache with `num_pages` usable pages (+1 scratch page); returns bytes allocated.

        Re-allocation drops all cached tokens and resets the page pool: only call it between requests,
        and before compile_model (captured CUDA graphs keep pointing at the tensors they were captured with).
        """
        if num_pages is not None:
            self.num_pages = num_pages
        self.caches.clear()  # free the old tensors before allocating the new ones
        shape_pages = self.num_pages + 1  # the last page is the scratch page of padded rows
        for name, spec in self.cache_specs.items():
            self.caches[name] = torch.zeros(
                shape_pages, self.page_size, spec.n_kv_heads, spec.head_dim, dtype=self.cache_dtype(spec),
                device=self.device,
            )
        self.pool = PagePool(self.num_pages, self.page_size)
        self.info.scratch_page = self.num_pages
        for name, st in self.state_specs.items():
            self.caches[name] = torch.zeros(self.info.max_batch_size + 1, *st.shape, dtype=st.dtype, device=self.device)
        by_layer = {k: v for k, v in self.caches.items() if k in self.cache_specs}
        for desc in self.attention_backends:
            desc.on_cache_init(by_layer)
        nbytes = sum(t.numel() * t.element_size() for t in self.caches.values())
        logger.info("KV cache: %d pages of %d tokens, %.1f MiB (%d state caches)", self.num_pages, self.page_size,
                    nbytes / 2**20, len(self.state_specs))
        return nbytes

    # ---- per step (called by the executor) -------------------------------------------------------------

    def update(self, sequences: Sequence[StepSequence]) -> None:
        """Fill this step's metadata (one host-to-device copy); prefills (> 1 token) first, then decodes."""
        self.update_columns(
            [s.token_ids for s in sequences], [s.input_pos for s in sequences], [s.pages for s in sequences],
            [s.slot for s in sequences],
        )

    def update_columns(self, token_ids: Sequence[Sequence[int]], input_pos: Sequence[int],
                       pages: Sequence[Sequence[int]], slots: Sequence[int]) -> None:
        """`update` with one list per field of StepSequence (the executor's steps: no object per sequence)."""
        if self.state_specs and min(slots) < 0:
            # Without its own row a sequence would read another one's state: refuse instead of mixing them.
            raise ValueError("the graph keeps per-sequence state (Mamba): every scheduled sequence needs a slot >= 0")
        self.info.nest_sequences(token_ids, input_pos, pages, slots)
        for desc in self.attention_backends:
            desc.host_prepare(self.info)

    @property
    def named_args(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the graph for the current step."""
        return self._graph_args(self.info.args())

    def padded_decode_args(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Graph arguments of a decode-only batch padded to `batch_size` rows (CUDA-graph capture/replay)."""
        return self._graph_args(self.info.padded_decode_args(batch_size))

    def _graph_args(self, meta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if (self.cache_specs or self.state_specs) and not self.caches:
            raise RuntimeError("caches are not allocated: run initialize_cache (cm.initialize_caches()) first")
        args = {"input_ids": meta["input_ids"], "position_ids": meta["position_ids"]}
        args.update((name, meta[name]) for name in self.metadata_names)
        args.update(self.caches)
        return args
