"""Triton paged-attention kernels over the shared [num_pages, page_size, n_kv_heads, head_dim] KV cache."""

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda

from .pdl import pdl_launch_args

LOG2E = 1.4426950408889634
# A window this wide never masks anything; lets the kernels treat "no window" as a plain number.
NO_WINDOW = 1 << 30


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through TF32 tensor cores and lose about three digits.
    return "ieee" if dtype == torch.float32 else "tf32"


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_dtype(dtype: torch.dtype):
    # The Triton interpreter multiplies 16-bit floats wrongly in tl.dot (bf16 goes through its raw bits),
    # so interpreted kernels feed tl.dot fp32; compiled ones use the input dtype for tensor cores.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return _TL_DTYPES[dtype]


def _window(sliding_window: int | None) -> int:
    return NO_WINDOW if sliding_window is None or sliding_window <= 0 else int(sliding_window)


@triton.jit
def _softcap_log2(s, cap):
    # Scores arrive already multiplied by log2(e); the cap acts on natural-unit logits, so undo it around tanh.
    x = s / (cap * 1.4426950408889634)
    # tanh through exp keeps the kernel portable (the interpreter has no libdevice).
    t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return t * (cap * 1.4426950408889634)


@triton.jit
def _context_attn_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, o_ptr, sinks_ptr,
    cu_seqlen_ptr, input_pos_ptr, page_table_ptr,
    s_qt, s_qh, s_ot, s_oh,
    s_kp, s_ks, s_kh, s_vp, s_vs, s_vh,
    s_pt,
    qk_scale, window, cap,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFT_CAP: tl.constexpr, HAS_SINKS: tl.constexpr, DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    m_blk = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(cu_seqlen_ptr + b)
    q_len = tl.load(cu_seqlen_ptr + b + 1) - q_start
    if m_blk * BLOCK_M >= q_len:
        return
    ctx = tl.load(input_pos_ptr + b)
    kv_len = ctx + q_len

    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * s_qt + h * s_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    q_pos = ctx + offs_m

    # Only key blocks some query of this tile can see: causal upper bound, window lower bound.
    last_pos = ctx + tl.minimum((m_blk + 1) * BLOCK_M, q_len) - 1
    lo = tl.maximum(ctx + m_blk * BLOCK_M - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = last_pos + 1

    # Finite floor instead of -inf keeps fully masked rows of a tile free of inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    pt_row = page_table_ptr + b * s_pt
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_len
        page = tl.load(pt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + page[:, None] * s_kp + slot[:, None] * s_ks + kvh * s_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + page[:, None] * s_vp + slot[:, None] * s_vs + kvh * s_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PREC, out_dtype=tl.float32) * qk_scale
        if SOFT_CAP:
            s = _softcap_log2(s, cap)
        dist = q_pos[:, None] - offs_n[None, :]
        visible = (dist >= 0) & (dist < window) & n_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PREC,
                                          out_dtype=tl.float32)
        m_i = m_new

    if HAS_SINKS:
        # Sinks join the softmax denominator only; they carry no value.
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(sink - m_new)
        acc = acc * alpha[:, None]
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_rows[:, None] * s_ot + h * s_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def context_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlen: torch.Tensor,
    input_pos: torch.Tensor,
    page_table: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    max_q_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of new queries over each sequence's paged cache (its context plus its new tokens).

    q: [T, n_heads, head_dim], sequences given by cu_seqlen [B+1]; the new keys/values must already be in
    the cache (`paged_kv_write.py`). Query t of sequence b sits at position input_pos[b] + t - cu_seqlen[b]
    and sees keys j with pos - sliding_window < j <= pos. Returns [T, n_heads, head_dim] in q's dtype.
    `max_q_len` (longest new-token run) sizes the grid; given, the launch needs no host sync.
    """
    num_tokens, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    assert n_heads % n_kv == 0, "n_heads must be a multiple of n_kv_heads"
    out = torch.empty_like(q) if out is None else out
    batch = cu_seqlen.numel() - 1
    if num_tokens == 0 or batch == 0:
        return out
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if max_q_len is None:
        max_q_len = int((cu_seqlen[1:] - cu_seqlen[:-1]).max().item())
    block_m = 16 if max_q_len <= 16 else 64
    block_n = 32
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    grid = (triton.cdiv(max(max_q_len, 1), block_m), batch, n_heads)
    _context_attn_kernel[grid](
        q, k_cache, v_cache, out, sinks if sinks is not None else q,
        cu_seqlen, input_pos, page_table,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        scale * LOG2E, _window(sliding_window), float(logit_cap or 0.0),
        GROUP=n_heads // n_kv, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        SOFT_CAP=bool(logit_cap), HAS_SINKS=sinks is not None,
        DOT_PREC=_dot_precision(q.dtype), DOT_DTYPE=_dot_dtype(q.dtype),
    )
    return out


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_o_ptr, part_lse_ptr, o_ptr, sinks_ptr, arrivals_ptr,
    seq_len_ptr, input_pos_ptr, page_table_ptr,
    s_qb, s_qh,
    s_kp, s_ks, s_kh, s_vp, s_vs, s_vh,
    s_pt,
    s_ob, s_oh, s_os, s_lb, s_lh, s_fb, s_fh,
    qk_scale, window, cap,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SOFT_CAP: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr, HAS_SINKS: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(input_pos_ptr + b) + tl.load(seq_len_ptr + b)
    start = tl.maximum(kv_len - window, 0)
    # Even split of the visible keys, rounded to whole key blocks.
    chunk = tl.cdiv(tl.cdiv(kv_len - start, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, kv_len)

    # All query heads of one KV head are processed together: each K/V tile is loaded once per group.
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b.to(tl.int64) * s_qb + heads[:, None] * s_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    pt_row = page_table_ptr + b * s_pt
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        page = tl.load(pt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
        slot = offs_n % PAGE_SIZE
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + page[:, None] * s_kp + slot[:, None] * s_ks + kvh * s_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + page[:, None] * s_vp + slot[:, None] * s_vs + kvh * s_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PREC, out_dtype=tl.float32) * qk_scale
        if SOFT_CAP:
            s = _softcap_log2(s, cap)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PREC,
                                          out_dtype=tl.float32)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # log2-domain LSE; -inf marks a split that saw no keys so the reduction ignores it.
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    b64 = b.to(tl.int64)
    gd_ok = g_ok[:, None] & d_ok[None, :]
    tl.store(part_o_ptr + b64 * s_ob + heads[:, None] * s_oh + split * s_os + offs_d[None, :], out, mask=gd_ok)
    tl.store(part_lse_ptr + b64 * s_lb + heads * s_lh + split, lse, mask=g_ok)

    # The last split of this (sequence, KV head) to finish merges all splits by their log-sum-exp: no second
    # kernel (it cost a launch a layer). Its arrival counter goes back to zero for the next launch, so the
    # counters stay zeroed between launches, captured CUDA graphs included.
    tl.debug_barrier()  # every thread's partial stores come before the release below
    counter = arrivals_ptr + b * tl.num_programs(1) + kvh
    arrived = tl.atomic_add(counter, 1, sem="acq_rel")
    if arrived == NUM_SPLITS - 1:
        tl.store(counter, 0)
        lse_row = part_lse_ptr + b64 * s_lb + heads * s_lh
        m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        for i in tl.static_range(NUM_SPLITS):
            m = tl.maximum(m, tl.load(lse_row + i, mask=g_ok, other=float("-inf"), cache_modifier=".cg"))
        if HAS_SINKS:
            sink = tl.load(sinks_ptr + heads, mask=g_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            m = tl.maximum(m, sink)
        m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all: weights 0, output 0
        denom = tl.zeros([BLOCK_G], dtype=tl.float32)
        merged = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for i in tl.static_range(NUM_SPLITS):
            w = tl.exp2(tl.load(lse_row + i, mask=g_ok, other=float("-inf"), cache_modifier=".cg") - m)
            o_i = tl.load(part_o_ptr + b64 * s_ob + heads[:, None] * s_oh + i * s_os + offs_d[None, :],
                          mask=gd_ok, other=0.0, cache_modifier=".cg")
            denom += w
            merged += o_i * w[:, None]
        if HAS_SINKS:
            denom += tl.exp2(sink - m)
        merged = merged / tl.where(denom == 0.0, 1.0, denom)[:, None]
        tl.store(o_ptr + b64 * s_fb + heads[:, None] * s_fh + offs_d[None, :], merged.to(o_ptr.dtype.element_ty),
                 mask=gd_ok)


def default_num_splits(max_kv_len: int) -> int:
    """Split count for decode: about one split per 256 cached tokens, a power of two in [1, 32].

    Depends only on the cache capacity (a shape), so captured CUDA graphs keep a fixed grid.
    """
    return min(32, triton.next_power_of_2(max(1, triton.cdiv(max_kv_len, 256))))


def occupancy_num_splits(batch: int, n_kv_heads: int, max_kv_len: int, num_sms: int) -> int:
    """Splits that fill the GPU when few sequences decode: ~2 programs per SM, a power of two in [1, 32], none
    under 64 keys (H200, 8B layer, 1024 keys, batch 1: 11.4 us with 4 splits, 6.1 us with 16; small_batch_kernels.py).
    Depends only on shapes, so a captured CUDA graph keeps a fixed grid."""
    want = triton.next_power_of_2(max(1, triton.cdiv(2 * num_sms, max(1, batch * n_kv_heads))))
    longest = triton.next_power_of_2(max(1, triton.cdiv(max_kv_len, 64)))
    return max(1, min(32, want, longest))


_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def _arrival_counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters, one per (sequence, KV head), that the decode kernel leaves zeroed after each launch.

    One buffer per device, allocated at the first (uncaptured) call and grown only when a larger batch needs
    more (before capture: captured sizes run eagerly first). Launches on one stream run one after another,
    so every layer can use the same counters.
    """
    buf = _ARRIVALS.get(device)
    if buf is None or buf.numel() < n:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"decode attention needs {n} arrival counters; run this batch size once before "
                               f"capturing it in a CUDA graph")
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _ARRIVALS[device] = buf
    return buf


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_len: torch.Tensor,
    input_pos: torch.Tensor,
    page_table: torch.Tensor,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    sinks: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split-K (flash-decoding) attention of one new query per sequence over its paged cache.

    q: [B, n_heads, head_dim]; the new key/value must already be in the cache. Each sequence's visible keys
    (input_pos + seq_len of them, cut by the window) are split in `num_splits` ranges computed in parallel,
    then merged by their log-sum-exp (by the last split to finish). Returns [B, n_heads, head_dim] in q's dtype.
    No host sync.
    """
    batch, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    assert n_heads % n_kv == 0, "n_heads must be a multiple of n_kv_heads"
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    page_size = k_cache.shape[1]
    if num_splits is None:
        num_splits = default_num_splits(page_table.shape[1] * page_size)
    group = n_heads // n_kv
    block_d = max(16, triton.next_power_of_2(head_dim))
    part_o = torch.empty(batch, n_heads, num_splits, head_dim, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(batch, n_heads, num_splits, device=q.device, dtype=torch.float32)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    _decode_split_kernel[(batch, n_kv, num_splits)](
        q, k_cache, v_cache, part_o, part_lse, out, sinks if sinks is not None else q,
        _arrival_counters(batch * n_kv, q.device),
        seq_len, input_pos, page_table,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        scale * LOG2E, _window(sliding_window), float(logit_cap or 0.0),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, NUM_SPLITS=num_splits,
        # tl.dot needs at least 16 rows; padded heads are masked out.
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=32, BLOCK_D=block_d,
        SOFT_CAP=bool(logit_cap), DOT_PREC=_dot_precision(q.dtype), DOT_DTYPE=_dot_dtype(q.dtype),
        HAS_SINKS=sinks is not None, **pdl_launch_args(q.device),
    )
    return out
