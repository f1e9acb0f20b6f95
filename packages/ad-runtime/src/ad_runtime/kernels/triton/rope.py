"""Triton rotate-half RoPE at position ids, reading a [cos | sin] cache (the "rope" kernel of the registry)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, cache_ptr, pos_ptr,
    s_xb, s_xs, s_xn, s_ob, s_os, s_on, s_cp, s_pb, s_ps,
    SEQ, N_HEADS,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
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
    for h0 in range(0, N_HEADS, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h[:, None] < N_HEADS) & i_ok[None, :]
        x_row = x_ptr + b * s_xb + s * s_xs + offs_h[:, None] * s_xn + offs_i[None, :]
        x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1].
        o1 = x1 * c[None, :] - x2 * sn[None, :]
        o2 = x2 * c[None, :] + x1 * sn[None, :]
        o_row = out_ptr + b * s_ob + s * s_os + offs_h[:, None] * s_on + offs_i[None, :]
        tl.store(o_row, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_row + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x_bsnd: torch.Tensor, out_bsnd: torch.Tensor, cache: torch.Tensor, pos: torch.Tensor) -> None:
    b, s, n, d = x_bsnd.shape
    assert x_bsnd.stride(-1) == 1 and out_bsnd.stride(-1) == 1 and d % 2 == 0
    if b * s == 0:
        return
    half = d // 2
    _rope_kernel[(b * s,)](
        x_bsnd, out_bsnd, cache, pos,
        x_bsnd.stride(0), x_bsnd.stride(1), x_bsnd.stride(2),
        out_bsnd.stride(0), out_bsnd.stride(1), out_bsnd.stride(2),
        cache.stride(0), pos.stride(0), pos.stride(1),
        s, n,
        HALF=half, BLOCK_H=min(16, triton.next_power_of_2(n)), BLOCK_HALF=triton.next_power_of_2(half),
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
    outs = []
    for x in (q, k):
        xs = _as_bsnd(x if x.stride(-1) == 1 else x.contiguous(), unsqueeze_dim)
        out = torch.empty(x.shape, dtype=torch.result_type(x, cache), device=x.device)
        _launch(xs, _as_bsnd(out, unsqueeze_dim), cache, position_ids)
        outs.append(out)
    return outs[0], outs[1]
