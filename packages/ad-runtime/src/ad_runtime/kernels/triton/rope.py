"""Triton rotate-half RoPE: explicit cos/sin (HF form) and position ids with a cos/sin cache."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr,
    s_xb, s_xs, s_xn, s_ob, s_os, s_on,
    s_cb, s_cs, s_sb, s_ss, s_pb, s_ps,
    SEQ, N_HEADS, HALF_OFF,
    HALF: tl.constexpr, USE_POS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    row = tl.program_id(0)
    b = (row // SEQ).to(tl.int64)
    s = (row % SEQ).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    i_ok = offs_i < HALF
    if USE_POS:
        # Cache rows are [cos(first half) | sin(second half)] at each position (flashinfer's layout).
        p = tl.load(pos_ptr + b * s_pb + s * s_ps).to(tl.int64)
        c_row = cos_ptr + p * s_cs
        s_row = sin_ptr + p * s_ss
    else:
        c_row = cos_ptr + b * s_cb + s * s_cs
        s_row = sin_ptr + b * s_sb + s * s_ss
    c1 = tl.load(c_row + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + HALF_OFF + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + HALF_OFF + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    for h0 in range(0, N_HEADS, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask = (offs_h[:, None] < N_HEADS) & i_ok[None, :]
        x_row = x_ptr + b * s_xb + s * s_xs + offs_h[:, None] * s_xn + offs_i[None, :]
        x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
        # x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1].
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
        o_row = out_ptr + b * s_ob + s * s_os + offs_h[:, None] * s_on + offs_i[None, :]
        tl.store(o_row, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_row + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x_bsnd: torch.Tensor, out_bsnd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            pos: torch.Tensor | None, half_off: int) -> None:
    b, s, n, d = x_bsnd.shape
    assert x_bsnd.stride(-1) == 1 and out_bsnd.stride(-1) == 1 and d % 2 == 0
    if b * s == 0:
        return
    half = d // 2
    if pos is None:
        cs = (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), 0, 0)
        pos = cos  # unused pointer
    else:
        cs = (0, cos.stride(0), 0, sin.stride(0), pos.stride(0), pos.stride(1))
    _rope_kernel[(b * s,)](
        x_bsnd, out_bsnd, cos, sin, pos,
        x_bsnd.stride(0), x_bsnd.stride(1), x_bsnd.stride(2),
        out_bsnd.stride(0), out_bsnd.stride(1), out_bsnd.stride(2),
        *cs,
        s, n, half_off,
        HALF=half, USE_POS=pos is not cos, BLOCK_H=min(16, triton.next_power_of_2(n)),
        BLOCK_HALF=triton.next_power_of_2(half),
    )


def _as_bsnd(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    # bnsd tensors (cos unsqueezed at 1) are viewed as bsnd, so one kernel serves both layouts.
    if unsqueeze_dim == 1:
        return x.transpose(1, 2)
    if unsqueeze_dim == 2:
        return x
    raise ValueError(f"unsqueeze_dim must be 1 (bnsd) or 2 (bsnd), got {unsqueeze_dim}")


def rope_with_explicit_cos_sin(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF apply_rotary_pos_emb: x * cos + rotate_half(x) * sin; cos/sin [b or 1, s, d]; q/k bnsd or bsnd."""
    outs = []
    for x in (q, k):
        xs = _as_bsnd(x if x.stride(-1) == 1 else x.contiguous(), unsqueeze_dim)
        c = cos.expand(xs.shape[0], -1, -1)
        sn = sin.expand(xs.shape[0], -1, -1)
        assert c.shape[-1] == xs.shape[-1], "cos/sin must cover the whole head dim"
        out = torch.empty(x.shape, dtype=torch.result_type(x, cos), device=x.device)
        _launch(xs, _as_bsnd(out, unsqueeze_dim), c, sn, None, xs.shape[-1] // 2)
        outs.append(out)
    return outs[0], outs[1]


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
        _launch(xs, _as_bsnd(out, unsqueeze_dim), cache, cache[:, half:], position_ids, 0)
        outs.append(out)
    return outs[0], outs[1]
