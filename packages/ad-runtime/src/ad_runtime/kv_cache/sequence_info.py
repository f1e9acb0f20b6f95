"""SequenceInfo: one step's batch as flat tensors, filled from host lists with one host-to-device copy."""

import bisect
from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch

# (name, dtype, size key): every field lives in one byte buffer at a fixed offset, so its address is
# stable across steps (CUDA graphs replay on the same memory) and one copy moves all of them.
# Size keys: "N" = max_num_tokens, "B" = max_batch_size, "B1" = max_batch_size + 1, "BP" = max_batch_size * P.
# Two such buffers: one with room for max_num_tokens tokens, and a small one with room for max_batch_size tokens
# that every step of that few tokens uses (all decode steps, so the CUDA graphs read it). A step copies its
# buffer's front up to the rows of the page table it uses: with N = max_num_tokens (8192) that was ~230 KB even
# for one decode row, 7.7 us of a ~0.6 ms small-model step on an H200, ahead of everything the step runs.
_FIELDS: tuple[tuple[str, torch.dtype, str], ...] = (
    ("input_ids", torch.int64, "N"),
    ("position_ids", torch.int64, "N"),
    ("slot_mapping", torch.int64, "N"),
    ("last_token_idx", torch.int64, "B"),
    ("batch_indices", torch.int32, "N"),
    ("seq_len", torch.int32, "B"),
    ("input_pos", torch.int32, "B"),
    ("cu_seqlen", torch.int32, "B1"),
    ("cu_num_pages", torch.int32, "B1"),
    ("last_page_len", torch.int32, "B"),
    ("slot_idx", torch.int64, "B"),
    ("page_indices", torch.int32, "BP"),
    ("page_table", torch.int32, "BP"),  # last: a step copies only the rows it uses
)
# Per-token fields (viewed with length T); the others are per sequence (length B, B+1 or [B, P]).
_TOKEN_FIELDS = frozenset({"input_ids", "position_ids", "slot_mapping", "batch_indices"})
_NP = {torch.int64: np.int64, torch.int32: np.int32}


class _StepBuffers:
    """One byte buffer on the host (pinned for a GPU) and its device twin, with every field at a fixed offset."""

    def __init__(self, sizes: dict[str, int], device: torch.device):
        self.layout: dict[str, tuple[int, torch.dtype, int]] = {}  # name -> (byte offset, dtype, numel)
        offset = 0
        for name, dtype, key in _FIELDS:
            self.layout[name] = (offset, dtype, sizes[key])
            offset += -(-sizes[key] * dtype.itemsize // 8) * 8  # keep every field 8-byte aligned
        pin = device.type == "cuda" and torch.cuda.is_available()
        self.host = torch.zeros(offset, dtype=torch.uint8, pin_memory=pin)
        self.dev = torch.zeros(offset, dtype=torch.uint8, device=device)
        self.np = {name: self.host_view(name).numpy() for name in self.layout}

    def host_view(self, name: str) -> torch.Tensor:
        off, dtype, numel = self.layout[name]
        return self.host[off : off + numel * dtype.itemsize].view(dtype)

    def dev_view(self, name: str, n: int) -> torch.Tensor:
        off, dtype, numel = self.layout[name]
        assert n <= numel, f"{name}: {n} > {numel}"
        return self.dev[off : off + n * dtype.itemsize].view(dtype)


class SequenceInfo:
    """The flattened batch of one step: prefills (seq_len > 1) first, then decodes (seq_len == 1).

    Use: `nest_sequences(token_ids, input_pos, page_tables)` once per step, then read `args()` (what
    the graph is called with) and `last_token_idx` (rows of the [1, T, vocab] logits to sample from).
    """

    def __init__(
        self,
        max_batch_size: int,
        max_seq_len: int,
        page_size: int,
        max_num_tokens: int | None = None,
        device: str | torch.device = "cpu",
    ):
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.page_size = page_size
        self.max_num_tokens = max_num_tokens or max_batch_size * max_seq_len
        self.max_pages_per_seq = -(-max_seq_len // page_size)
        self.device = torch.device(device)
        # Page id that padded dummy sequences write into; set by the cache interface (last cache page).
        self.scratch_page: int | None = None
        # Decode batch sizes that a compile backend captured; decode-only batches get padded rows up to the next.
        self.cuda_graph_batch_sizes: list[int] = []

        sizes = {"B": max_batch_size, "B1": max_batch_size + 1, "BP": max_batch_size * self.max_pages_per_seq}
        # Steps of up to `_small_tokens` tokens use the small buffers (see _FIELDS), longer ones the large.
        self._small_tokens = min(max_batch_size, self.max_num_tokens)
        self._small = _StepBuffers({**sizes, "N": self._small_tokens}, self.device)
        self._large = _StepBuffers({**sizes, "N": self.max_num_tokens}, self.device)
        self._cur = self._small  # the current step's
        self._copy_done: torch.cuda.Event | None = None
        self.batch_info_host = torch.zeros(3, dtype=torch.int32)
        self._batch_info_np = self.batch_info_host.numpy()  # one numpy store, not three torch item writes
        # What padded_decode_args passes as batch_info_host. A persistent tensor like batch_info_host, not a new
        # one per call: one made under inference_mode has other dispatch keys, and torch.compile, guarding on
        # them, traced the model again at the first step that was not a padded decode.
        self._padded_batch_info = torch.zeros(3, dtype=torch.int32)
        self._views: dict[tuple[int, int, bool, bool], dict[str, torch.Tensor]] = {}  # _args' memo, by shape
        self._num_seqs = 0
        self._num_tokens = 0
        self._num_rows = 0  # sequences incl. padding rows written this step

    # ---- views -----------------------------------------------------------------------------------

    def _buffers(self, num_tokens: int) -> _StepBuffers:
        """The buffers a step of `num_tokens` tokens (padding rows included) is written to and read from."""
        return self._small if num_tokens <= self._small_tokens else self._large

    def _field(self, name: str, num_seqs: int, num_tokens: int) -> torch.Tensor:
        buf = self._buffers(num_tokens)
        if name in _TOKEN_FIELDS:
            t = buf.dev_view(name, num_tokens)
            return t.view(1, num_tokens) if name in ("input_ids", "position_ids") else t
        if name == "page_table":
            return buf.dev_view(name, num_seqs * self.max_pages_per_seq).view(num_seqs, self.max_pages_per_seq)
        if name in ("cu_seqlen", "cu_num_pages"):
            return buf.dev_view(name, num_seqs + 1)
        if name == "page_indices":
            return buf.dev_view(name, buf.layout[name][2])  # fixed size: stable shape for CUDA graphs
        return buf.dev_view(name, num_seqs)

    def args(self) -> dict[str, torch.Tensor]:
        """Every graph input and metadata tensor of this step, by name (see METADATA_NAMES)."""
        return self._args(self._num_seqs, self._num_tokens, self.batch_info_host)

    def padded_decode_args(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The same views for a decode-only batch padded to `batch_size` rows (for CUDA-graph capture)."""
        self._padded_batch_info.numpy()[:] = (0, 0, batch_size)
        return self._args(batch_size, batch_size, self._padded_batch_info)

    def _args(self, b: int, t: int, batch_info: torch.Tensor) -> dict[str, torch.Tensor]:
        # The views depend only on the step's shape (the buffers never move), so each shape's are made once: ~17
        # views a step were ~30 us of host time on the development VM, a batch-1 decode step's every step. Keyed
        # by inference mode too, since views made under it carry other dispatch keys (torch.compile guards on them).
        key = (b, t, batch_info is self.batch_info_host, torch.is_inference_mode_enabled())
        views = self._views.get(key)
        if views is None:
            if len(self._views) >= 1024:  # every (sequences, tokens) pair a long run meets: bound the memo
                self._views.clear()
            views = self._views[key] = self._make_args(b, t, batch_info)
        return dict(views)  # the caller's own dict: changing it leaves the memo alone

    def _make_args(self, b: int, t: int, batch_info: torch.Tensor) -> dict[str, torch.Tensor]:
        # last_token_idx is included for graphs that gather the last tokens themselves (gather_logits_before_lm_head).
        out = {name: self._field(name, b, t) for name, _, _ in _FIELDS}
        out["batch_info_host"] = batch_info
        host = self._buffers(t).host_view
        out["seq_len_host"] = host("seq_len")[:b]
        out["input_pos_host"] = host("input_pos")[:b]
        out["cu_seqlen_host"] = host("cu_seqlen")[: b + 1]
        out["slot_idx_host"] = host("slot_idx")[:b]
        return out

    @property
    def last_token_idx(self) -> torch.Tensor:
        """int64 [B]: index into the T axis of each sequence's last token (for gathering logits)."""
        return self._cur.dev_view("last_token_idx", self._num_seqs)

    @property
    def num_sequences(self) -> int:
        return self._num_seqs

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def num_prefill(self) -> int:
        return int(self._batch_info_np[0])

    @property
    def num_decode(self) -> int:
        return int(self._batch_info_np[2])

    @property
    def is_decode_only(self) -> bool:
        return self._num_seqs > 0 and self.num_prefill == 0

    @property
    def num_padded_rows(self) -> int:
        """Rows written this step, padding included (>= num_sequences)."""
        return self._num_rows

    def padded_batch_size(self, num_seqs: int) -> int | None:
        """The smallest captured decode batch size >= num_seqs, or None."""
        i = bisect.bisect_left(self.cuda_graph_batch_sizes, num_seqs)
        return self.cuda_graph_batch_sizes[i] if i < len(self.cuda_graph_batch_sizes) else None

    # ---- filling -----------------------------------------------------------------------------------

    def nest_sequences(
        self,
        token_ids: Sequence[Sequence[int]],
        input_pos: Sequence[int],
        page_tables: Sequence[Sequence[int]],
        slots: Sequence[int] | None = None,
    ) -> None:
        """Fill the step: per sequence its new tokens, how many tokens are already cached, its pages and its
        state slot (row of the per-sequence state caches; -1 when it has none).

        Sequences with more than one new token (prefill, chunked prefill) must come before those with
        one (decode). Page tables must cover input_pos + len(tokens) tokens.
        """
        if len(token_ids) == 1 and len(token_ids[0]) == 1 and len(input_pos) == 1 and len(page_tables) == 1:
            slot = -1 if slots is None else slots[0]
            self._nest_lone_decode(token_ids[0][0], int(input_pos[0]), page_tables[0], slot)
        else:
            self._nest_many(token_ids, input_pos, page_tables, slots)

    def _nest_many(self, token_ids: Sequence[Sequence[int]], input_pos: Sequence[int],
                   page_tables: Sequence[Sequence[int]], slots: Sequence[int] | None) -> None:
        """nest_sequences for any batch, a numpy pass per field."""
        b = len(token_ids)
        seq_len, pos0, num_decode, num_pages = self._checked_lengths(token_ids, input_pos, page_tables)
        ps, mp = self.page_size, self.max_pages_per_seq
        total = pos0 + seq_len
        t = int(seq_len.sum())
        n_pages = -(-total // ps)

        rows = self._padded_rows(b, num_decode)
        if self._copy_done is not None:
            self._copy_done.synchronize()  # the previous step's copy still reads the host buffer

        self._cur = self._buffers(t + rows - b)
        a = self._cur.np
        a["seq_len"][:b] = seq_len
        a["input_pos"][:b] = pos0
        cu = a["cu_seqlen"]
        cu[0] = 0
        cu[1 : b + 1] = np.cumsum(seq_len)
        table = a["page_table"][: b * mp].reshape(b, mp)
        table.fill(-1)
        # One scatter of all page ids (row, column) instead of a numpy assignment per sequence.
        held = int(num_pages.sum())
        col = np.arange(held) - np.repeat(np.cumsum(num_pages) - num_pages, num_pages)
        table[np.repeat(np.arange(b), num_pages), col] = np.fromiter(chain.from_iterable(page_tables), np.int32, held)
        a["input_ids"][:t] = np.fromiter(chain.from_iterable(token_ids), dtype=np.int64, count=t)
        bidx = np.repeat(np.arange(b), seq_len)
        pos = np.arange(t) - np.repeat(cu[:b], seq_len) + np.repeat(pos0, seq_len)
        a["batch_indices"][:t] = bidx
        a["position_ids"][:t] = pos
        a["slot_mapping"][:t] = table[bidx, pos // ps].astype(np.int64) * ps + pos % ps
        a["last_token_idx"][:b] = cu[1 : b + 1] - 1
        a["last_page_len"][:b] = (total - 1) % ps + 1
        a["slot_idx"][:b] = -1 if slots is None else np.asarray(slots, dtype=np.int64)
        self._fill_page_indices(table, n_pages)
        if rows > b:
            self._fill_padding(b, rows, t)

        self._batch_info_np[:] = (b - num_decode, t - num_decode, num_decode)
        self._num_seqs, self._num_tokens, self._num_rows = b, t, rows
        self._copy_to_device(rows)

    def _nest_lone_decode(self, token: int, pos: int, pages: Sequence[int], slot: int) -> None:
        """nest_sequences for one sequence with one new token (a batch-1 chat decode step): the same fields by
        scalar stores. The general path's ~40 numpy calls on one-element arrays took ~95 us of host time a step on
        the development VM; a small model's GPU step is shorter than that and the host sets the pace."""
        ps, mp = self.page_size, self.max_pages_per_seq
        total, held = pos + 1, len(pages)
        need = -(-total // ps)
        if total > self.max_seq_len:
            raise self._too_long(total)
        if not need <= held <= mp:
            raise self._bad_pages(held, need)
        rows = self._padded_rows(1, 1)
        if self._copy_done is not None:
            self._copy_done.synchronize()  # the previous step's copy still reads the host buffer
        self._cur = self._buffers(rows)
        a = self._cur.np
        a["seq_len"][0], a["input_pos"][0], a["cu_seqlen"][:2] = 1, pos, (0, 1)
        table = a["page_table"][:mp]
        table.fill(-1)
        table[:held] = pages
        a["input_ids"][0], a["position_ids"][0], a["batch_indices"][0] = token, pos, 0
        a["slot_mapping"][0] = int(table[pos // ps]) * ps + pos % ps
        a["last_token_idx"][0], a["last_page_len"][0], a["slot_idx"][0] = 0, pos % ps + 1, slot
        a["cu_num_pages"][:2] = (0, need)
        a["page_indices"][:need] = table[:need]
        if rows > 1:
            self._fill_padding(1, rows, 1)
        self._batch_info_np[:] = (0, 0, 1)
        self._num_seqs, self._num_tokens, self._num_rows = 1, 1, rows
        self._copy_to_device(rows)

    def _padded_rows(self, b: int, num_decode: int) -> int:
        """Rows this step writes: a decode-only batch of b sequences is padded up to the next captured CUDA-graph
        batch size, when the buffers hold that many rows."""
        pad_to = self.padded_batch_size(b) if num_decode == b and self.scratch_page is not None else None
        rows = pad_to or b
        if rows > self.max_batch_size or rows > self.max_num_tokens:
            rows = b
        return rows

    def _fill_page_indices(self, table: np.ndarray, n_pages: np.ndarray) -> None:
        """cu_num_pages and page_indices: the pages each sequence uses this step, sequence after sequence
        (the first n_pages[i] entries of row i of the filled page table, in row order)."""
        a, b = self._cur.np, len(table)
        cnp = a["cu_num_pages"]
        cnp[0] = 0
        cnp[1 : b + 1] = np.cumsum(n_pages)
        used = int(cnp[b])
        a["page_indices"][:used] = table[np.arange(table.shape[1]) < n_pages[:, None]]

    def _checked_lengths(self, token_ids: Sequence[Sequence[int]], input_pos: Sequence[int],
                         page_tables: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        """(new tokens, cached tokens) per sequence, the number of decodes and the pages each sequence holds;
        ValueError for a step this buffer cannot hold or the graph cannot run."""
        b = len(token_ids)
        if not (len(input_pos) == len(page_tables) == b):
            raise ValueError("token_ids, input_pos and page_tables must have one entry per sequence")
        if b == 0 or b > self.max_batch_size:
            raise ValueError(f"a step needs 1..{self.max_batch_size} sequences, got {b}")
        seq_len = np.fromiter(map(len, token_ids), dtype=np.int64, count=b)
        pos0 = np.asarray(input_pos, dtype=np.int64)
        total = pos0 + seq_len
        t = int(seq_len.sum())
        if seq_len.min() < 1:
            raise ValueError("every scheduled sequence needs at least one new token")
        if t > self.max_num_tokens:
            raise ValueError(f"{t} tokens in one step exceed max_num_tokens={self.max_num_tokens}")
        if total.max() > self.max_seq_len:
            raise self._too_long(int(total.max()))
        is_decode = seq_len == 1
        num_decode = int(is_decode.sum())
        if not is_decode[b - num_decode :].all():
            raise ValueError("order the batch prefills first (more than one new token), then decodes")
        mp = self.max_pages_per_seq
        num_pages = np.fromiter(map(len, page_tables), dtype=np.int64, count=b)
        need = -(-total // self.page_size)
        bad = (num_pages < need) | (num_pages > mp)
        if bad.any():
            i = int(bad.argmax())
            raise self._bad_pages(int(num_pages[i]), int(need[i]))
        return seq_len, pos0, num_decode, num_pages

    def _too_long(self, total: int) -> ValueError:
        return ValueError(f"a sequence reaches {total} tokens, above max_seq_len={self.max_seq_len}")

    def _bad_pages(self, held: int, need: int) -> ValueError:
        return ValueError(f"a page table has {held} pages; needs {need} (at most {self.max_pages_per_seq})")

    def resolve_future_tokens(self, future: torch.Tensor) -> None:
        """Replace placeholder ids -(row + 1) of this step's tokens by `future[row]`, on the device.

        Overlapped scheduling feeds a token sampled by the previous step before the host has read it; this
        runs after the step's input copy and before the model (or a CUDA-graph replay) reads input_ids.
        """
        ids = self._cur.dev_view("input_ids", self._num_tokens)
        if ids.is_cuda:
            from ..kernels.triton.future_tokens import resolve_future_tokens_  # Triton only where a GPU runs

            resolve_future_tokens_(ids, future)
            return
        rows = (~ids).clamp_(min=0, max=future.numel() - 1)  # ~id == -id - 1
        torch.where(ids < 0, future.index_select(0, rows), ids, out=ids)

    def dummy_columns(self, lengths: Sequence[int]) -> tuple[list[list[int]], list[int], list[list[int]], list[int]]:
        """Columns (token ids, input_pos, pages, state slots) of sequences of these lengths from position 0 on the
        scratch page and the state caches' scratch row: valid inputs for warm-ups and captures that touch no real
        cache data (a slot of -1 would index a model's per-sequence state out of range)."""
        pages = [[self.scratch_page] * -(-n // self.page_size) for n in lengths]
        return [[0] * n for n in lengths], [0] * len(lengths), pages, [self.max_batch_size] * len(lengths)

    def _fill_padding(self, b: int, rows: int, t: int) -> None:
        """Dummy decode rows b..rows-1: one token at position 0 on the scratch page (CUDA-graph padding)."""
        a, ps, mp, sp = self._cur.np, self.page_size, self.max_pages_per_seq, self.scratch_page
        n = rows - b
        a["seq_len"][b:rows] = 1
        a["input_pos"][b:rows] = 0
        a["cu_seqlen"][b + 1 : rows + 1] = a["cu_seqlen"][b] + np.arange(1, n + 1)
        table = a["page_table"][: rows * mp].reshape(rows, mp)
        table[b:rows].fill(-1)
        table[b:rows, 0] = sp
        a["input_ids"][t : t + n] = 0
        a["position_ids"][t : t + n] = 0
        a["slot_mapping"][t : t + n] = sp * ps
        a["batch_indices"][t : t + n] = np.arange(b, rows)
        a["last_token_idx"][b:rows] = np.arange(t, t + n)
        a["last_page_len"][b:rows] = 1
        a["slot_idx"][b:rows] = self.max_batch_size  # the scratch row of the state caches
        used = int(a["cu_num_pages"][b])
        a["cu_num_pages"][b + 1 : rows + 1] = used + np.arange(1, n + 1)
        a["page_indices"][used : used + n] = sp

    def _copy_to_device(self, rows: int) -> None:
        buf = self._cur
        nbytes = buf.layout["page_table"][0] + rows * self.max_pages_per_seq * 4
        buf.dev[:nbytes].copy_(buf.host[:nbytes], non_blocking=True)
        if self.device.type == "cuda":
            if self._copy_done is None:
                self._copy_done = torch.cuda.Event()
            self._copy_done.record()
