"""Triton paged context (prefill) attention over the [num_pages, page_size, n_kv_heads, head_dim] KV cache, and
the helpers that the decode kernel (paged_decode.py) shares."""

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

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
def _kv_tile(k_cache_ptr, v_cache_ptr, pt_row, offs_n, n_ok, kvh, offs_d, d_ok,
             s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, PAGE_SIZE: tl.constexpr):
    """Keys and values of cache positions `offs_n` of one sequence (its page-table row) and KV head."""
    page = tl.load(pt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
    slot = offs_n % PAGE_SIZE
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_cache_ptr + page[:, None] * s_kp + slot[:, None] * s_ks + kvh * s_kh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + page[:, None] * s_vp + slot[:, None] * s_vs + kvh * s_vh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, cap, SOFT_CAP: tl.constexpr,
                         DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of flash attention in the log2 domain: returns the updated (max, denominator, accumulator).
    MASKED=False: every query of the tile sees every key of it (`visible` is not read)."""
    s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PREC, out_dtype=tl.float32) * qk_scale
    if SOFT_CAP:
        s = _softcap_log2(s, cap)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PREC,
                                      out_dtype=tl.float32)
    return m_new, l_i, acc


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
    SPLIT_FULL: tl.constexpr, PACK_GQA: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    # PACK_GQA: a tile's rows are BLOCK_Q = BLOCK_M // GROUP query positions times the GROUP query heads of one KV
    # head, so each K/V tile loaded serves every head that reads it (else BLOCK_Q = BLOCK_M positions of one head).
    # The last query blocks see the most keys: they start first, so the grid's tail is short ones.
    m_blk = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    r = tl.arange(0, BLOCK_M)
    if PACK_GQA:
        kvh = tl.program_id(2)
        head = kvh * GROUP + r % GROUP
        offs_m = m_blk * BLOCK_Q + r // GROUP
    else:
        kvh = tl.program_id(2) // GROUP
        head = tl.program_id(2) + r * 0
        offs_m = m_blk * BLOCK_Q + r
    q_start = tl.load(cu_seqlen_ptr + b)
    q_len = tl.load(cu_seqlen_ptr + b + 1) - q_start
    if m_blk * BLOCK_Q >= q_len:
        return
    ctx = tl.load(input_pos_ptr + b)
    kv_len = ctx + q_len

    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    if PACK_GQA:
        row_ok = row_ok & (r < BLOCK_Q * GROUP)  # rows past the last whole group of heads stay idle
    d_ok = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * s_qt + head[:, None] * s_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    q_pos = ctx + offs_m

    # Only key blocks some query of this tile can see: causal upper bound, window lower bound.
    last_pos = ctx + tl.minimum((m_blk + 1) * BLOCK_Q, q_len) - 1
    lo = tl.maximum(ctx + m_blk * BLOCK_Q - window + 1, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = last_pos + 1

    # Finite floor instead of -inf keeps fully masked rows of a tile free of inf - inf.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    pt_row = page_table_ptr + b * s_pt
    # Key blocks before the tile's first query are seen by all its queries (no window): no mask to build.
    full_hi = lo
    if SPLIT_FULL:
        if window >= 1073741824:  # NO_WINDOW
            full_hi = ((ctx + m_blk * BLOCK_Q + 1) // BLOCK_N) * BLOCK_N
    for start_n in range(lo, full_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _kv_tile(k_cache_ptr, v_cache_ptr, pt_row, offs_n, offs_n < kv_len, kvh, offs_d, d_ok,
                        s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, PAGE_SIZE)
        m_i, l_i, acc = _online_softmax_step(q, k, v, None, m_i, l_i, acc, qk_scale, cap,
                                             SOFT_CAP, DOT_PREC, DOT_DTYPE, False)
    for start_n in range(full_hi, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_len
        k, v = _kv_tile(k_cache_ptr, v_cache_ptr, pt_row, offs_n, n_ok, kvh, offs_d, d_ok,
                        s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, PAGE_SIZE)
        dist = q_pos[:, None] - offs_n[None, :]
        visible = (dist >= 0) & (dist < window) & n_ok[None, :]
        m_i, l_i, acc = _online_softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale, cap,
                                             SOFT_CAP, DOT_PREC, DOT_DTYPE, True)

    if HAS_SINKS:
        # Sinks join the softmax denominator only; they carry no value.
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        m_new = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.exp2(sink - m_new)
        acc = acc * alpha[:, None]
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_rows[:, None] * s_ot + head[:, None] * s_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


class PrefillLaunch(NamedTuple):
    """Tile sizes and launch of the context kernel (benchmarks/gpu/attention_prefill_bench.py sweeps them)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split_full: bool = True  # key blocks every query of a tile sees run without building a mask
    pack_gqa: bool = False  # a tile holds all query heads of one KV head (block_m // group positions each)


def prefill_launch(max_q_len: int, head_dim: int, elem_size: int = 2, smem_limit: int | None = None,
                   group: int = 1) -> PrefillLaunch:
    """Tiles by the longest chunk of the step and the query heads per KV head (`group`). Measured on an H200
    (benchmarks/README.md, fifteenth and sixteenth sessions; one layer of Llama-3.1-8B shapes, bf16, group 4):
    with the group's heads packed into a tile, 128-row tiles (32 positions x 4 heads) of 32 keys in four warps and
    three stages run 8 x 1024 prompts 8% faster than the unpacked 64 x 64, 8 x 512 over 3,584 cached keys 3% and 32 x
    256 4% faster than 64 x 32; from 2,048 tokens packed 128 x 128 tiles in eight warps and two stages gain 7% over
    unpacked ones. Without packing (one head, or groups a tile cannot hold): 64 x 32 below 512 tokens, 64 x 64 in
    two stages to 2,047, 128 x 128 from 2,048. The larger tiles are taken only for 16-bit inputs and heads up to 128
    wide, and only where they fit the device's shared memory (`smem_limit`, bytes a block may opt in to; None: not
    checked) with a quarter to spare."""
    base = PrefillLaunch(16, 32, 4, 3) if max_q_len <= 16 else PrefillLaunch(64, 32, 4, 3)
    if max_q_len <= 16 or elem_size != 2 or head_dim > 128:
        return base
    long_chunk = max_q_len >= 2048
    packed = PrefillLaunch(*((128, 128, 8, 2) if long_chunk else (128, 32, 4, 3)), pack_gqa=True)
    if packs_gqa(packed, group):
        tuned = packed
    elif max_q_len < 512:
        return base
    else:
        tuned = PrefillLaunch(128, 128, 8, 2) if long_chunk else PrefillLaunch(64, 64, 4, 2)
    if smem_limit is not None and 5 * _tile_bytes(tuned, head_dim, elem_size) > 4 * smem_limit:
        return base
    return tuned


def packs_gqa(launch: PrefillLaunch, group: int) -> bool:
    """Whether `launch` packs the `group` query heads of a KV head into its tiles: asked for, and at least 16
    query positions a tile (tl.dot's smallest row count)."""
    return launch.pack_gqa and 1 < group <= launch.block_m // 16


def _tile_bytes(launch: PrefillLaunch, head_dim: int, elem_size: int) -> int:
    """Shared memory the q tile and the pipelined k/v tiles take."""
    d = max(16, triton.next_power_of_2(head_dim))
    return (launch.block_m * d + launch.num_stages * 2 * launch.block_n * d) * elem_size


@functools.lru_cache(maxsize=None)
def _smem_limit(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


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
    launch: PrefillLaunch | None = None,
) -> torch.Tensor:
    """Causal attention of new queries over each sequence's paged cache (its context plus its new tokens).

    q: [T, n_heads, head_dim], sequences given by cu_seqlen [B+1]; the new keys/values must already be in
    the cache (`paged_kv_write.py`). Query t of sequence b sits at position input_pos[b] + t - cu_seqlen[b]
    and sees keys j with pos - sliding_window < j <= pos. Returns [T, n_heads, head_dim] in q's dtype.
    `max_q_len` (longest new-token run) sizes the grid; given, the launch needs no host sync. `launch`: tiles
    and launch other than prefill_launch's choice (benchmarks).
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
    launch = launch or prefill_launch(max_q_len, head_dim, q.element_size(), _smem_limit(q.device), n_heads // n_kv)
    block_m, block_n = launch.block_m, launch.block_n
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = n_heads // n_kv
    pack = packs_gqa(launch, group)
    block_q = block_m // group if pack else block_m
    grid = (triton.cdiv(max(max_q_len, 1), block_q), batch, n_kv if pack else n_heads)
    _context_attn_kernel[grid](
        q, k_cache, v_cache, out, sinks if sinks is not None else q,
        cu_seqlen, input_pos, page_table,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        scale * LOG2E, _window(sliding_window), float(logit_cap or 0.0),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        SOFT_CAP=bool(logit_cap), HAS_SINKS=sinks is not None,
        DOT_PREC=_dot_precision(q.dtype), DOT_DTYPE=_dot_dtype(q.dtype), SPLIT_FULL=launch.split_full,
        PACK_GQA=pack, BLOCK_Q=block_q,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out
