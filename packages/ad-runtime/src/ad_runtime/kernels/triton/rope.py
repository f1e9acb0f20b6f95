"""Triton rotate-half RoPE at position ids, reading a [cos | sin] cache (the "rope" kernel of the registry)."""

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda

from .pdl import pdl_launch_args


@triton.jit
def _rotate_heads(x_ptr, out_ptr, s_xn, s_on, n_heads, c, sn, offs_i, i_ok,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate the n_heads heads of one token (x_ptr/out_ptr point at its head 0)."""
    for h0 in range(0, n_heads, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h[:, None] < n_heads) & i_ok[None, :]
        x_row = x_ptr + offs_h[:, None] * s_xn + offs_i[None, :]
        x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1], as explicit FMAs: the decode kernel's
        # fused rotation (paged_decode._rotated) does the same operations and must round the same.
        o1 = tl.fma(x1, c[None, :], -(x2 * sn[None, :]))
        o2 = tl.fma(x2, c[None, :], x1 * sn[None, :])
        o_row = out_ptr + offs_h[:, None] * s_on + offs_i[None, :]
        tl.store(o_row, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_row + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cache_ptr, pos_ptr,
    s_qb, s_qs, s_qn, s_kb, s_ks, s_kn, s_qob, s_qos, s_qon, s_kob, s_kos, s_kon, s_cp, s_pb, s_ps,
    SEQ, NQ, NK,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    # One program per token rotates its query and key heads: one launch for both (a decode step's rope was two
    # launches a layer, ~1.8 us each on an H200).
    row = tl.program_id(0)
    b = (row // SEQ).to(tl.int64)
    s = (row % SEQ).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    i_ok = offs_i < HALF
    # Cache rows are [cos(first half) | sin(second half)] at each position (flashinfer's layout); both halves
    # of a head use the same cos and sin.
    p = tl.load(pos_ptr + b * s_pb + s * s_ps).to(tl.int64)
    c = tl.load(cache_ptr + p * s_cp + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    sn = tl.load(cache_ptr + p * s_cp + HALF + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + b * s_qb + s * s_qs, qo_ptr + b * s_qob + s * s_qos, s_qn, s_qon, NQ, c, sn, offs_i, i_ok,
                  HALF, BLOCK_H)
    _rotate_heads(k_ptr + b * s_kb + s * s_ks, ko_ptr + b * s_kob + s * s_kos, s_kn, s_kon, NK, c, sn, offs_i, i_ok,
                  HALF, BLOCK_H)


def _launch(q: torch.Tensor, k: torch.Tensor, q_out: torch.Tensor, k_out: torch.Tensor, cache: torch.Tensor,
            pos: torch.Tensor) -> None:
    """Rotate bsnd q and k (same b and s, any head counts) into q_out and k_out."""
    b, s, nq, d = q.shape
    nk = k.shape[2]
    assert all(t.stride(-1) == 1 for t in (q, k, q_out, k_out)) and d % 2 == 0 and k.shape[:2] == (b, s)
    if b * s == 0:
        return
    half = d // 2
    _rope_kernel[(b * s,)](
        q, k, q_out, k_out, cache, pos,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cache.stride(0), pos.stride(0), pos.stride(1),
        s, nq, nk,
        HALF=half, BLOCK_H=min(16, triton.next_power_of_2(max(nq, nk))), BLOCK_HALF=triton.next_power_of_2(half),
        **pdl_launch_args(q.device),
    )


def _as_bsnd(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    # bnsd tensors (unsqueeze_dim 1) are viewed as bsnd, so one kernel serves both layouts.
    if unsqueeze_dim == 1:
        return x.transpose(1, 2)
    if unsqueeze_dim == 2:
        return x
    raise ValueError(f"unsqueeze_dim must be 1 (bnsd) or 2 (bsnd), got {unsqueeze_dim}")


def rope_with_cos_sin_cache(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, cos_sin_cache: torch.Tensor, unsqueeze_dim: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q/k at position_ids [b, s]; cos_sin_cache [max_pos, d] holds cos(pos * inv_freq) in
    its first d/2 columns and sin in the last d/2 (flashinfer's layout). q/k are bsnd (unsqueeze_dim=2) or
    bnsd (1); outputs have dtype result_type(x, cos_sin_cache), like the torch reference."""
    half = cos_sin_cache.shape[-1] // 2
    assert 2 * half == q.shape[-1], "the cache must hold d/2 cos and d/2 sin columns"
    cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    ins = [_as_bsnd(x if x.stride(-1) == 1 else x.contiguous(), unsqueeze_dim) for x in (q, k)]
    outs = [torch.empty(x.shape, dtype=torch.result_type(x, cache), device=x.device) for x in (q, k)]
    _launch(ins[0], ins[1], _as_bsnd(outs[0], unsqueeze_dim), _as_bsnd(outs[1], unsqueeze_dim), cache, position_ids)
    return outs[0], outs[1]
