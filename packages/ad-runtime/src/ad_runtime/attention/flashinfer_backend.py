"""The "flashinfer" attention backend: FlashInfer's paged prefill/decode wrappers, planned outside CUDA graphs."""

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    import flashinfer
except ImportError as e:  # the registry turns this into a CompileError naming the backend
    raise ImportError("flashinfer is not installed") from e  # the registry adds the install hint, once

from ad_runtime.kernels.triton import paged_decode as _pd
from ad_runtime.kernels.triton import paged_kv_write as _kv

from .descriptor import AttentionDescriptor
from .registry import AttentionRegistry
from .torch_backend import write_paged_kv

_WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended float workspace (split-KV partial results)
# Tensor-core decode on Hopper defaults to the FA3 paged prefill kernel, which reads the KV cache at ~22% of
# the memory roofline once a batch has many sequences (H200, Llama-3.1-8B shapes, 1024-token contexts: 1183 us
# a layer at batch 256 against 264 us with the FA2 kernel, 97% of the roofline; batch 64: 267 vs 72 us;
# benchmarks/gpu/attention_decode_bench.py). At batch 1 the default is a little faster (20 vs 24 us).
_FA2_DECODE_MIN_ROWS = 8

# Decode rows go to our split-KV Triton kernel, not FlashInfer's decode: it reads the KV cache at its byte roofline
# from one row to 256 (H200, Llama-3.1-8B layer: 256 rows of 1024 keys 253 us against FA2's 274; 256 rows of 160
# keys 54 against 85; one row 6 against 19; small_batch_kernels.py), and it needs no plan per step. FlashInfer's
# decode remains for what the kernel does not take: a KV cache of another dtype than the queries (fp8).
# AUTODEPLOY_FLASHINFER_DECODE=1 sends decode rows to FlashInfer's decode again, to compare whole runs in one call
# (not AD_-prefixed: the configuration loader reads AD_* variables as settings).
_FLASHINFER_DECODE = os.environ.get("AUTODEPLOY_FLASHINFER_DECODE", "0") == "1"
_LN2 = math.log(2.0)


@dataclass(frozen=True)
class _LayerKey:
    """Everything a FlashInfer plan depends on besides the batch: one set of wrappers per distinct key."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    page_size: int
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    window_left: int
    logit_cap: float
    scale: float


@dataclass
class _Batch:
    """Host-side (CPU) description of one step, enough to plan without touching the GPU."""

    num_prefill: int
    num_prefill_tokens: int
    num_decode: int
    cu_seqlen: torch.Tensor  # int32 [B+1]
    kv_indptr: torch.Tensor  # int32 [B+1] pages per sequence, prefix sums
    last_page_len: torch.Tensor  # int32 [B]
    page_indices: torch.Tensor  # device int32, used pages packed (SequenceInfo's stable buffer)
    fingerprint: tuple

    @staticmethod
    def from_host(batch_info_host: torch.Tensor, seq_len_host: torch.Tensor, input_pos_host: torch.Tensor,
                  cu_seqlen_host: torch.Tensor, page_indices: torch.Tensor, page_size: int) -> "_Batch":
        """The step's batch; every layer of a step asks with the same values, so the last answer is reused
        (about a dozen small host ops a layer saved: prefill and mixed steps run them outside CUDA graphs)."""
        num_prefill, num_prefill_tokens, num_decode = (int(x) for x in batch_info_host.tolist())
        b = num_prefill + num_decode
        fp = (num_prefill, num_prefill_tokens, num_decode, page_size,
              seq_len_host[:b].numpy().tobytes(), input_pos_host[:b].numpy().tobytes())
        last = _STATE.last_batch
        # cu_seqlen is the prefix sum of seq_len (SequenceInfo), so the fingerprint covers it.
        if (last is not None and last.fingerprint == fp and last.page_indices.data_ptr() == page_indices.data_ptr()
                and last.page_indices.shape == page_indices.shape):
            return last
        batch = _Batch._build(num_prefill, num_prefill_tokens, num_decode, b, seq_len_host, input_pos_host,
                              cu_seqlen_host, page_indices, page_size, fp)
        _STATE.last_batch = batch
        return batch

    @staticmethod
    def _build(num_prefill: int, num_prefill_tokens: int, num_decode: int, b: int, seq_len_host: torch.Tensor,
               input_pos_host: torch.Tensor, cu_seqlen_host: torch.Tensor, page_indices: torch.Tensor,
               page_size: int, fp: tuple) -> "_Batch":
        total = input_pos_host[:b].to(torch.int64) + seq_len_host[:b].to(torch.int64)
        pages = (total + page_size - 1) // page_size
        kv_indptr = torch.zeros(b + 1, dtype=torch.int32)
        kv_indptr[1:] = torch.cumsum(pages, 0).to(torch.int32)
        last = ((total - 1) % page_size + 1).to(torch.int32)
        # Lengths and positions decide the plan (the fingerprint); page ids are read from page_indices at run time.
        return _Batch(num_prefill, num_prefill_tokens, num_decode, cu_seqlen_host[: b + 1].to(torch.int32),
                      kv_indptr, last, page_indices, fp)


@dataclass
class _Wrapper:
    impl: Any
    planned: tuple | None = None  # (step, fingerprint) of the last plan


@dataclass
class _State:
    """Wrappers, workspace and what was planned for the current step (one per process)."""

    workspace: torch.Tensor | None = None
    step: int = 0
    graph_sizes: frozenset[int] = frozenset()
    max_pages: int = 0
    keys: set[_LayerKey] = field(default_factory=set)
    prefill: dict[_LayerKey, _Wrapper] = field(default_factory=dict)
    decode: dict[_LayerKey, _Wrapper] = field(default_factory=dict)
    graph_decode: dict[tuple[_LayerKey, int], _Wrapper] = field(default_factory=dict)
    last_batch: _Batch | None = None  # the step's batch, built by its first layer and reused by the others

    def ensure_workspace(self, device: torch.device) -> torch.Tensor:
        if self.workspace is None or self.workspace.device != device:
            # FlashInfer wants the float workspace zeroed before first use.
            self.workspace = torch.zeros(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            self.prefill.clear()
            self.decode.clear()
            self.graph_decode.clear()
        return self.workspace

    def prefill_wrapper(self, key: _LayerKey, device: torch.device) -> _Wrapper:
        if key not in self.prefill:
            ws = self.ensure_workspace(device)
            self.prefill[key] = _Wrapper(flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD"))
        return self.prefill[key]

    def decode_wrapper(self, key: _LayerKey, rows: int, device: torch.device, graph: bool) -> _Wrapper:
        # Tensor-core decode pays off once several query heads share a KV head.
        tc = key.n_heads // key.n_kv_heads >= 4
        if not graph:
            if key not in self.decode:
                ws = self.ensure_workspace(device)
                # One eager wrapper serves every batch size: the decodes of mixed steps, usually many rows.
                impl = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc,
                                                                     **_decode_backend(tc, _FA2_DECODE_MIN_ROWS))
                self.decode[key] = _Wrapper(impl)
            return self.decode[key]
        if (key, rows) not in self.graph_decode:
            ws = self.ensure_workspace(device)
            # CUDA-graph wrappers read their metadata from fixed buffers that plan() refills before each replay.
            impl = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                ws, "NHD", use_cuda_graph=True, use_tensor_cores=tc, **_decode_backend(tc, rows),
                paged_kv_indptr_buffer=torch.zeros(rows + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buffer=torch.zeros(max(self.max_pages, 1), dtype=torch.int32, device=device),
                paged_kv_last_page_len_buffer=torch.zeros(rows, dtype=torch.int32, device=device),
            )
            self.graph_decode[(key, rows)] = _Wrapper(impl)
        return self.graph_decode[(key, rows)]


_STATE = _State()


def _decode_backend(tensor_cores: bool, rows: int) -> dict[str, str]:
    """The FA2 kernel for tensor-core decode of batches of `_FA2_DECODE_MIN_ROWS` or more (see its comment)."""
    return {"backend": "fa2"} if tensor_cores and rows >= _FA2_DECODE_MIN_ROWS else {}


def _plan_prefill(w: _Wrapper, key: _LayerKey, batch: _Batch) -> None:
    n = batch.num_prefill
    w.impl.plan(
        batch.cu_seqlen[: n + 1], batch.kv_indptr[: n + 1], batch.page_indices[: int(batch.kv_indptr[n])],
        batch.last_page_len[:n], key.n_heads, key.n_kv_heads, key.head_dim, key.page_size,
        # causal masks align the queries to the end of their sequence's keys: chunked prefill works as is
        causal=True, sm_scale=key.scale, window_left=key.window_left, logits_soft_cap=key.logit_cap,
        q_data_type=key.q_dtype, kv_data_type=key.kv_dtype,
    )
    w.planned = (_STATE.step, batch.fingerprint)


def _plan_decode(w: _Wrapper, key: _LayerKey, batch: _Batch) -> None:
    p, d = batch.num_prefill, batch.num_decode
    start, end = int(batch.kv_indptr[p]), int(batch.kv_indptr[p + d])
    w.impl.plan(
        batch.kv_indptr[p : p + d + 1] - start, batch.page_indices[start:end], batch.last_page_len[p : p + d],
        key.n_heads, key.n_kv_heads, key.head_dim, key.page_size,
        sm_scale=key.scale, window_left=key.window_left, logits_soft_cap=key.logit_cap,
        q_data_type=key.q_dtype, kv_data_type=key.kv_dtype,
    )
    w.planned = (_STATE.step, batch.fingerprint)


def _split_kv_decode(key: _LayerKey, rows: int) -> bool:
    """Whether a decode batch of `rows` goes to the split-KV Triton kernel (no FlashInfer plan then)."""
    return rows > 0 and key.q_dtype == key.kv_dtype and not _FLASHINFER_DECODE


def _use_graph_wrapper(batch: _Batch) -> bool:
    """Decode-only batches of a captured size go through wrappers with fixed buffers; so do those being
    captured and their warm-up runs, which by torch's capture recipe run on a side stream (the warm-up
    plans the wrapper that the capture then records, since plan() cannot run inside a capture)."""
    if batch.num_prefill > 0 or batch.num_decode == 0:
        return False
    if batch.num_decode in _STATE.graph_sizes or torch.cuda.is_current_stream_capturing():
        return True
    return torch.cuda.current_stream() != torch.cuda.default_stream()


def _ready(w: _Wrapper, key: _LayerKey, batch: _Batch, plan) -> None:
    if w.planned == (_STATE.step, batch.fingerprint):
        return
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "flashinfer attention was not planned for this batch before CUDA-graph capture; "
            "call the backend's host_prepare(sequence_info) (and run once eagerly) before capturing"
        )
    plan(w, key, batch)


def _rows(x: torch.Tensor) -> torch.Tensor:
    # The Triton kernels index rows and heads by stride but need the head dim contiguous.
    return x if x.stride(-1) == 1 else x.contiguous()


def _apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> None:
    # A sink adds exp(sink) to the softmax denominator: out scales by S / (S + e^sink) = sigmoid(ln S - sink).
    # FlashInfer's lse is base 2.
    factor = torch.sigmoid(lse * _LN2 - sinks.float()[None, :])
    out.mul_(factor[..., None].to(out.dtype))


def _write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slots: torch.Tensor) -> None:
    if k_cache.dtype == k.dtype and v_cache.dtype == v.dtype:
        # One kernel for keys and values (two index_copy kernels before: 2 x 2.2 us a layer at batch 1).
        _kv.write_paged_kv(_rows(k), _rows(v), k_cache, v_cache, slots)
    else:  # a cast into an fp8 cache
        write_paged_kv(k_cache, slots, k)
        write_paged_kv(v_cache, slots, v)


def _layer_key(q: torch.Tensor, k_cache: torch.Tensor, scale: float | None, sliding_window: int | None,
               logit_cap: float | None) -> _LayerKey:
    head_dim = q.shape[-1]
    return _LayerKey(
        n_heads=q.shape[2], n_kv_heads=k_cache.shape[2], head_dim=head_dim, page_size=k_cache.shape[1],
        q_dtype=q.dtype, kv_dtype=k_cache.dtype,
        # our window w admits pos - w < j <= pos; FlashInfer's window_left counts keys left of pos
        window_left=sliding_window - 1 if sliding_window is not None and sliding_window > 0 else -1,
        logit_cap=float(logit_cap or 0.0),
        scale=scale if scale is not None else 1.0 / math.sqrt(head_dim),
    )


def _split_kv_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_len: torch.Tensor,
                        input_pos: torch.Tensor, page_table: torch.Tensor, key: _LayerKey, sliding_window: int | None,
                        logit_cap: float | None, sinks: torch.Tensor | None, out: torch.Tensor) -> None:
    """Decode rows through the split-KV Triton kernel (the comment above _LN2 says why)."""
    _pd.decode_attention(
        q, k_cache, v_cache, seq_len, input_pos, page_table, scale=key.scale,
        sliding_window=sliding_window if sliding_window and sliding_window > 0 else None,
        logit_cap=logit_cap or None, sinks=sinks, out=out,
    )


@torch.library.custom_op("auto_deploy::flashinfer_cached_attention", mutates_args=("k_cache", "v_cache"))
def flashinfer_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_info_host: torch.Tensor,
    seq_len_host: torch.Tensor,
    input_pos_host: torch.Tensor,
    cu_seqlen_host: torch.Tensor,
    page_indices: torch.Tensor,
    slot_mapping: torch.Tensor,
    seq_len: torch.Tensor,
    input_pos: torch.Tensor,
    page_table: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor | None,
    scale: float | None,
    sliding_window: int | None,
    logit_cap: float | None,
) -> torch.Tensor:
    """Write the step's k/v into the paged cache, then FlashInfer prefill + decode: [1, T, n, d] -> [1, T, n, d]."""
    _write_kv(k[0], v[0], k_cache, v_cache, slot_mapping[: q.shape[1]])
    key = _layer_key(q, k_cache, scale, sliding_window, logit_cap)
    _STATE.keys.add(key)
    batch = _Batch.from_host(batch_info_host, seq_len_host, input_pos_host, cu_seqlen_host, page_indices,
                             key.page_size)
    _STATE.max_pages = max(_STATE.max_pages, page_indices.numel())
    q3 = q[0].contiguous()
    out = torch.empty_like(q3)
    caches = (k_cache, v_cache)
    want_lse = sinks is not None
    npt, nd = batch.num_prefill_tokens, batch.num_decode
    if batch.num_prefill > 0:
        w = _STATE.prefill_wrapper(key, q.device)
        _ready(w, key, batch, _plan_prefill)
        res = w.impl.run(q3[:npt], caches, out=out[:npt], return_lse=want_lse)
        if want_lse:
            _apply_sinks(out[:npt], res[1], sinks)
    if nd > 0 and _split_kv_decode(key, nd):
        rows = slice(batch.num_prefill, batch.num_prefill + nd)
        _split_kv_attention(q3[npt : npt + nd], k_cache, v_cache, seq_len[rows], input_pos[rows], page_table[rows],
                            key, sliding_window, logit_cap, sinks, out[npt : npt + nd])
    elif nd > 0:
        w = _STATE.decode_wrapper(key, nd, q.device, graph=_use_graph_wrapper(batch))
        _ready(w, key, batch, _plan_decode)
        res = w.impl.run(q3[npt : npt + nd], caches, out=out[npt : npt + nd], return_lse=want_lse)
        if want_lse:
            _apply_sinks(out[npt : npt + nd], res[1], sinks)
    return out[None]


@flashinfer_cached_attention.register_fake
def _flashinfer_cached_attention_fake(q: torch.Tensor, *_: object) -> torch.Tensor:
    return q.new_empty(q.shape)  # nothing else changes the output's shape (fakes are called positionally)


@AttentionRegistry.register("flashinfer")
class FlashInferAttentionDescriptor(AttentionDescriptor):
    """FlashInfer paged prefill/decode (GPU only). plan() runs in host_prepare, outside captured graphs;
    decode-only batches of a CUDA-graph size use wrappers with fixed buffers that plan() refills."""

    @classmethod
    def cached_op(cls):
        return torch.ops.auto_deploy.flashinfer_cached_attention.default

    @classmethod
    def metadata_names(cls) -> tuple[str, ...]:
        # seq_len, input_pos and page_table: the split-KV Triton decode of small batches reads them on the device.
        return ("batch_info_host", "seq_len_host", "input_pos_host", "cu_seqlen_host", "page_indices", "slot_mapping",
                "seq_len", "input_pos", "page_table")

    @classmethod
    def host_prepare(cls, info: Any) -> None:
        """Plan every layer configuration seen so far for this step (before the forward or a graph replay)."""
        _STATE.step += 1
        _STATE.graph_sizes = frozenset(info.cuda_graph_batch_sizes)
        rows = info.num_padded_rows
        # A padded decode batch (CUDA-graph replay) is planned with its padding rows, as the graph runs it.
        named = info.padded_decode_args(rows) if rows > info.num_sequences else info.args()
        _STATE.max_pages = max(_STATE.max_pages, named["page_indices"].numel())
        batch = _Batch.from_host(named["batch_info_host"], named["seq_len_host"], named["input_pos_host"],
                                 named["cu_seqlen_host"], named["page_indices"], info.page_size)
        if named["page_indices"].device.type != "cuda":
            return
        device = named["page_indices"].device
        for key in _STATE.keys:
            if key.page_size != info.page_size:
                continue
            if batch.num_prefill > 0:
                _plan_prefill(_STATE.prefill_wrapper(key, device), key, batch)
            if batch.num_decode > 0 and not _split_kv_decode(key, batch.num_decode):
                w = _STATE.decode_wrapper(key, batch.num_decode, device, graph=_use_graph_wrapper(batch))
                _plan_decode(w, key, batch)

    @classmethod
    def on_cache_init(cls, caches: dict[str, torch.Tensor]) -> None:
        """Allocate the shared workspace on the caches' device (wrappers never hold cache tensors)."""
        device = next(iter(caches.values())).device
        if device.type == "cuda":
            _STATE.ensure_workspace(device)
