"""Split-KV (flash-decoding) Triton attention of one new query per sequence over the paged KV cache."""

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda

from .paged_attention import LOG2E, _dot_dtype, _dot_precision, _kv_tile, _online_softmax_step, _window
from .pdl import pdl_launch_args


# The decode rows of a mixed step are slices that start after the prefill rows: without this, Triton compiles a
# variant of the kernel for each alignment of their pointers (seq_len[num_prefill:] is 16-byte aligned only when
# num_prefill % 4 == 0), i.e. JIT compiles in the middle of serving after the build compiled and captured the rest.
@triton.jit(do_not_specialize_on_alignment=["q_ptr", "o_ptr", "seq_len_ptr", "input_pos_ptr", "page_table_ptr"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_o_ptr, part_lse_ptr, o_ptr, sinks_ptr, arrivals_ptr,
    seq_len_ptr, input_pos_ptr, page_table_ptr,
    kn_ptr, vn_ptr, slot_ptr, rpos_ptr, cs_ptr,
    s_qb, s_qh,
    s_kp, s_ks, s_kh, s_vp, s_vs, s_vh,
    s_pt,
    s_ob, s_oh, s_os, s_lb, s_lh, s_fb, s_fh,
    s_knb, s_knh, s_vnb, s_vnh, s_cs,
    qk_scale, window, cap,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SOFT_CAP: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr, HAS_SINKS: tl.constexpr, MIN_KEYS: tl.constexpr,
    ROPE: tl.constexpr, HALF: tl.constexpr, USE_PDL: tl.constexpr, TRIGGER_LATE: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    kv_len = tl.load(input_pos_ptr + b) + tl.load(seq_len_ptr + b)
    start = tl.maximum(kv_len - window, 0)
    # Even split of the visible keys, rounded to whole key blocks, of at least MIN_KEYS keys each: the grid's
    # split count is fixed by shapes when a graph is captured, so a short context leaves the splits past its last
    # key idle; they leave at once and the merge waits for and reads only the `active` splits that saw keys.
    chunk = tl.maximum(tl.cdiv(tl.cdiv(kv_len - start, NUM_SPLITS), BLOCK_N) * BLOCK_N, MIN_KEYS)
    if MIN_KEYS == 0:
        active = NUM_SPLITS
    else:
        active = tl.maximum(tl.cdiv(kv_len - start, chunk), 1)
    cs_row = cs_ptr
    if ROPE:
        cs_row = cs_ptr + tl.load(rpos_ptr + b).to(tl.int64) * s_cs
    # The lengths, positions and the split's range above come from the step's metadata, written before the step
    # (the kernel before this one waited for all earlier work before letting it launch, pdl.py): only q and the
    # new key and value, the previous kernel's outputs, must wait. The dependent loads leave the critical path.
    if USE_PDL:
        cuda.gdc_wait()
        if not TRIGGER_LATE:
            cuda.gdc_launch_dependents()
    if ROPE:
        # The split that reads the new key (the step's last) writes it, rotated, and its value to the cache first:
        # no other program reads that slot, and the barrier orders the write before this program's reads.
        if split == (kv_len - 1 - start) // chunk:
            _write_new_kv(kn_ptr + b.to(tl.int64) * s_knb + kvh * s_knh, vn_ptr + b.to(tl.int64) * s_vnb + kvh * s_vnh,
                          k_cache_ptr, v_cache_ptr, tl.load(slot_ptr + b).to(tl.int64), kvh, cs_row,
                          s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, HEAD_DIM, PAGE_SIZE, BLOCK_D, HALF)
            tl.debug_barrier()
    if split < active:
        _decode_split(q_ptr, k_cache_ptr, v_cache_ptr, part_o_ptr, part_lse_ptr, o_ptr, sinks_ptr, arrivals_ptr,
                      page_table_ptr, cs_row, b, kvh, split, start + split * chunk,
                      tl.minimum(start + split * chunk + chunk, kv_len), active,
                      s_qb, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_pt, s_ob, s_oh, s_os, s_lb, s_lh, s_fb, s_fh,
                      qk_scale, cap, GROUP, HEAD_DIM, PAGE_SIZE, NUM_SPLITS, BLOCK_G, BLOCK_N, BLOCK_D, SOFT_CAP,
                      DOT_PREC, DOT_DTYPE, HAS_SINKS, ROPE, HALF)
    if USE_PDL and TRIGGER_LATE:
        # From two rows the next kernel (the output projection's skinny GEMM) launches only as this one's programs
        # finish: launched at the start, its programs would sit on the SMs waiting, holding the shared memory this
        # kernel's later waves need (H200, 8B shapes, 8 rows: 4.74 against 4.92 ms a step). At one row the next is
        # the GEMV, whose light programs may wait early (4.20 against 4.23 ms a step).
        cuda.gdc_launch_dependents()


@triton.jit
def _rotated(rows, offs_d, mask, cs_row, HALF: tl.constexpr):
    """x * cos + rotate_half(x) * sin in fp32 for head rows `rows` ([R, 1] pointers) at features offs_d, computed
    as the RoPE kernels compute it (cos and sin of feature i and i + HALF are the cache row's entries i)."""
    first = offs_d < HALF
    i = tl.where(first, offs_d, offs_d - HALF)
    x = tl.load(rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(rows + tl.where(first, offs_d + HALF, offs_d - HALF)[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cs_row + i, mask=offs_d < 2 * HALF, other=0.0).to(tl.float32)[None, :]
    sn = tl.load(cs_row + HALF + i, mask=offs_d < 2 * HALF, other=0.0).to(tl.float32)[None, :]
    # fma(x, cos, -+ xp * sin): the RoPE kernels' exact operations (_rotate_heads), so both round alike; written
    # out, the compiler would fuse whichever product it likes into the add and differ from them in the last bit.
    xs = xp * sn
    return tl.fma(x, c, tl.where(first[None, :], -xs, xs))


@triton.jit
def _write_new_kv(k_row, v_row, k_cache_ptr, v_cache_ptr, slot, kvh, cs_row,
                  s_kp, s_ks, s_kh, s_vp, s_vs, s_vh,
                  HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, HALF: tl.constexpr):
    """Rotate one token's key of one KV head into its cache slot and copy its value (rope_kv_write's work)."""
    offs_r = tl.arange(0, 2)  # one row, in a block of two (the smallest shape every Triton op takes)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_r[:, None] < 1) & (offs_d[None, :] < HEAD_DIM)
    page, off = slot // PAGE_SIZE, slot % PAGE_SIZE
    k = _rotated(k_row + offs_r[:, None] * 0, offs_d, mask, cs_row, HALF)
    tl.store(k_cache_ptr + page * s_kp + off * s_ks + kvh * s_kh + offs_r[:, None] * 0 + offs_d[None, :],
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_row + offs_r[:, None] * 0 + offs_d[None, :], mask=mask, other=0.0)
    tl.store(v_cache_ptr + page * s_vp + off * s_vs + kvh * s_vh + offs_r[:, None] * 0 + offs_d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_split(
    q_ptr, k_cache_ptr, v_cache_ptr, part_o_ptr, part_lse_ptr, o_ptr, sinks_ptr, arrivals_ptr, page_table_ptr, cs_row,
    b, kvh, split, lo, hi, active,
    s_qb, s_qh, s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, s_pt, s_ob, s_oh, s_os, s_lb, s_lh, s_fb, s_fh,
    qk_scale, cap,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SOFT_CAP: tl.constexpr,
    DOT_PREC: tl.constexpr, DOT_DTYPE: tl.constexpr, HAS_SINKS: tl.constexpr, ROPE: tl.constexpr,
    HALF: tl.constexpr,
):
    """One split of one (sequence, KV head): its keys [lo, hi); the last of the `active` splits merges them all.
    With ROPE the queries arrive before RoPE and are rotated here (rounded to the output's dtype, as the RoPE
    kernel would have stored them)."""

    # All query heads of one KV head are processed together: each K/V tile is loaded once per group.
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q_rows = q_ptr + b.to(tl.int64) * s_qb + heads[:, None] * s_qh
    if ROPE:
        q = _rotated(q_rows, offs_d, g_ok[:, None] & d_ok[None, :], cs_row, HALF).to(o_ptr.dtype.element_ty)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    pt_row = page_table_ptr + b * s_pt
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k, v = _kv_tile(k_cache_ptr, v_cache_ptr, pt_row, offs_n, n_ok, kvh, offs_d, d_ok,
                        s_kp, s_ks, s_kh, s_vp, s_vs, s_vh, PAGE_SIZE)
        m_i, l_i, acc = _online_softmax_step(q, k, v, n_ok[None, :], m_i, l_i, acc, qk_scale, cap,
                                             SOFT_CAP, DOT_PREC, DOT_DTYPE, True)

    empty = l_i == 0.0
    b64 = b.to(tl.int64)
    gd_ok = g_ok[:, None] & d_ok[None, :]
    if NUM_SPLITS == 1:  # one program saw every key: normalise and store, no partials and no merge
        if HAS_SINKS:
            l_i += tl.exp2(tl.load(sinks_ptr + heads, mask=g_ok, other=0.0).to(tl.float32) * 1.4426950408889634 - m_i)
        tl.store(o_ptr + b64 * s_fb + heads[:, None] * s_fh + offs_d[None, :],
                 (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(o_ptr.dtype.element_ty), mask=gd_ok)
    else:
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        # log2-domain LSE; -inf marks a split that saw no keys so the reduction ignores it.
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(part_o_ptr + b64 * s_ob + heads[:, None] * s_oh + split * s_os + offs_d[None, :], out, mask=gd_ok)
        tl.store(part_lse_ptr + b64 * s_lb + heads * s_lh + split, lse, mask=g_ok)

        # The last split of this (sequence, KV head) to finish merges all splits by their log-sum-exp: no second
        # kernel (it cost a launch a layer). Its arrival counter goes back to zero for the next launch, so the
        # counters stay zeroed between launches, captured CUDA graphs included.
        tl.debug_barrier()  # every thread's partial stores come before the release below
        counter = arrivals_ptr + b * tl.num_programs(1) + kvh
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == active - 1:
            tl.store(counter, 0)
            lse_row = part_lse_ptr + b64 * s_lb + heads * s_lh
            m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
            # Unrolled over every split the grid has (their loads overlap), masked to the active ones.
            for i in tl.static_range(NUM_SPLITS):
                m = tl.maximum(m, tl.load(lse_row + i, mask=g_ok & (i < active), other=float("-inf"),
                                          cache_modifier=".cg"))
            if HAS_SINKS:
                sink = tl.load(sinks_ptr + heads, mask=g_ok, other=0.0).to(tl.float32) * 1.4426950408889634
                m = tl.maximum(m, sink)
            m = tl.where(m == float("-inf"), 0.0, m)  # no keys at all: weights 0, output 0
            denom = tl.zeros([BLOCK_G], dtype=tl.float32)
            merged = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
            for i in tl.static_range(NUM_SPLITS):
                w = tl.exp2(tl.load(lse_row + i, mask=g_ok & (i < active), other=float("-inf"),
                                    cache_modifier=".cg") - m)
                o_i = tl.load(part_o_ptr + b64 * s_ob + heads[:, None] * s_oh + i * s_os + offs_d[None, :],
                              mask=gd_ok & (i < active), other=0.0, cache_modifier=".cg")
                denom += w
                merged += o_i * w[:, None]
            if HAS_SINKS:
                denom += tl.exp2(sink - m)
            merged = merged / tl.where(denom == 0.0, 1.0, denom)[:, None]
            tl.store(o_ptr + b64 * s_fb + heads[:, None] * s_fh + offs_d[None, :], merged.to(o_ptr.dtype.element_ty),
                     mask=gd_ok)


def default_num_splits(max_kv_len: int) -> int:
    """Split count without a GPU to size by: about one split per 256 cached tokens, a power of two in [1, 32]."""
    return min(32, triton.next_power_of_2(max(1, triton.cdiv(max_kv_len, 256))))


def occupancy_num_splits(batch: int, n_kv_heads: int, max_kv_len: int, num_sms: int) -> int:
    """Splits that fill the GPU when few sequences decode: ~2 programs per SM, a power of two in [1, 32], none
    under 64 keys (H200, 8B layer, 1024 keys, batch 1: 11.4 us with 4 splits, 6.1 us with 16; small_batch_kernels.py).
    Depends only on shapes, so a captured CUDA graph keeps a fixed grid."""
    want = triton.next_power_of_2(max(1, triton.cdiv(2 * num_sms, max(1, batch * n_kv_heads))))
    longest = triton.next_power_of_2(max(1, triton.cdiv(max_kv_len, 64)))
    return max(1, min(32, want, longest))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """The GPU's SM count (one without a GPU: Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def default_splits(batch: int, n_kv_heads: int, max_kv_len: int, device: torch.device) -> int:
    """The split count decode_attention uses unless told: by occupancy on a GPU, by cache capacity without one."""
    if device.type != "cuda":
        return default_num_splits(max_kv_len)
    return occupancy_num_splits(batch, n_kv_heads, max_kv_len, _num_sms(device))


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch configuration of the decode kernel: keys per tile, warps and software-pipeline stages."""

    block_n: int = 32
    num_warps: int = 4
    num_stages: int = 3
    min_keys: int = 64  # keys a split reads at least (0: every split of the grid takes part, however short)

    @staticmethod
    def for_splits(num_splits: int) -> "DecodeLaunch":
        """64-key tiles once each program reads a whole sequence or half of one (many rows), else 32.

        H200, Llama-3.1-8B layer, one CUDA graph per kernel (small_batch_kernels.py --sweep-launch): 64-key tiles
        with 4 warps and 3 stages read 256 rows of 1024 keys in 253 us (the K/V byte roofline: 253 us; FlashInfer
        FA2: 274 us; 32-key tiles: 287 us), 64 rows in 67 us (FA2 78), 32 rows (2 splits) in 38 us (FA2 42); 256
        rows of 160 keys: 54 us against FA2's 85.
        """
        return DecodeLaunch(block_n=64 if num_splits <= 2 else 32,
                            min_keys=int(os.environ.get("AUTODEPLOY_DECODE_MIN_KEYS", "64")))


class NewKeysWithRope(NamedTuple):
    """A decode step's new keys and values before RoPE, for decode_attention to rotate and write into the cache.

    k, v: [B, n_kv_heads, head_dim]; slot_mapping: [B] flat cache slots; position_ids: [B]; cos_sin_cache:
    [max_pos, head_dim] = [cos | sin] (rotate-half RoPE over the whole head).
    """

    k: torch.Tensor
    v: torch.Tensor
    slot_mapping: torch.Tensor
    position_ids: torch.Tensor
    cos_sin_cache: torch.Tensor


def _out_dtype(q: torch.Tensor, rope: NewKeysWithRope | None) -> torch.dtype:
    return q.dtype if rope is None else torch.result_type(q, rope.cos_sin_cache)


def _rope_args(rope: NewKeysWithRope | None, q: torch.Tensor, seq_len: torch.Tensor) -> tuple[tuple, tuple]:
    """The kernel's new-key arguments: (k, v, slots, positions, cos/sin table) and their strides; without rope,
    placeholders it never reads."""
    r = rope if rope is not None else NewKeysWithRope(q, q, seq_len, seq_len, q)
    if rope is not None:
        head_dim = q.shape[-1]
        assert head_dim % 2 == 0 and rope.cos_sin_cache.shape[-1] == head_dim, "full-width rotate-half RoPE only"
        assert r.k.stride(-1) == 1 and r.v.stride(-1) == 1 and r.cos_sin_cache.stride(-1) == 1
    return ((r.k, r.v, r.slot_mapping, r.position_ids, r.cos_sin_cache),
            (r.k.stride(0), r.k.stride(1), r.v.stride(0), r.v.stride(1), r.cos_sin_cache.stride(0)))


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


def _partials(out: torch.Tensor, num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split outputs [B, n, splits, d] and log-sum-exps [B, n, splits] in fp32; with one split the kernel stores
    the output directly and never reads them (`out` stands in)."""
    if num_splits == 1:
        return out, out
    batch, n_heads, head_dim = out.shape
    return (torch.empty(batch, n_heads, num_splits, head_dim, device=out.device, dtype=torch.float32),
            torch.empty(batch, n_heads, num_splits, device=out.device, dtype=torch.float32))


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
    launch: DecodeLaunch | None = None,
    rope: NewKeysWithRope | None = None,
) -> torch.Tensor:
    """Split-K (flash-decoding) attention of one new query per sequence over its paged cache.

    q: [B, n_heads, head_dim]; the new key/value must already be in the cache, or, with `rope`, q and the new keys
    arrive before RoPE and the kernel rotates them and writes the new key/value itself. Each sequence's visible keys
    (input_pos + seq_len of them, cut by the window) are split in `num_splits` ranges computed in parallel, then
    merged by their log-sum-exp (by the last split to finish). Returns [B, n_heads, head_dim] in q's dtype (with
    rope: result_type(q, cos_sin_cache), as the RoPE op gives). No host sync.
    """
    batch, n_heads, head_dim = q.shape
    page_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    assert n_heads % n_kv == 0, "n_heads must be a multiple of n_kv_heads"
    out = out if out is not None else torch.empty(q.shape, device=q.device, dtype=_out_dtype(q, rope))
    if batch == 0:
        return out
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    num_splits = num_splits or default_splits(batch, n_kv, page_table.shape[1] * page_size, q.device)
    group = n_heads // n_kv
    part_o, part_lse = _partials(out, num_splits)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    launch = launch or DecodeLaunch.for_splits(num_splits)
    rope_ptrs, rope_strides = _rope_args(rope, q, seq_len)
    _decode_split_kernel[(batch, n_kv, num_splits)](
        q, k_cache, v_cache, part_o, part_lse, out, sinks if sinks is not None else q,
        _arrival_counters(batch * n_kv, q.device),
        seq_len, input_pos, page_table,
        *rope_ptrs,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        page_table.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        *rope_strides,
        scale * LOG2E, _window(sliding_window), float(logit_cap or 0.0),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size, NUM_SPLITS=num_splits,
        # tl.dot needs at least 16 rows; padded heads are masked out.
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=launch.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        SOFT_CAP=bool(logit_cap), DOT_PREC=_dot_precision(out.dtype), DOT_DTYPE=_dot_dtype(out.dtype),
        HAS_SINKS=sinks is not None, MIN_KEYS=launch.min_keys, ROPE=rope is not None, HALF=head_dim // 2,
        num_warps=launch.num_warps, num_stages=launch.num_stages, TRIGGER_LATE=batch > 1, **pdl_launch_args(q.device),
    )
    return out
