"""Triton RMSNorm with Hugging Face Llama semantics (fp32 variance, cast back, times weight), alone or after a
residual add."""

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda

from .pdl import pdl_launch_args


@triton.jit
def _store_normed(x, w_ptr, out_row_ptr, offs, mask, eps, HIDDEN: tl.constexpr):
    """Write weight * rmsnorm(x) for one row `x` (loaded, in its own dtype, zero past the mask)."""
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    # HF rounds the normalised activations to the input dtype before the weight multiply.
    y = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_row_ptr + offs, (w * y).to(out_row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, w_ptr, out_ptr, s_x, s_o, eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0)
    _store_normed(x, w_ptr, out_ptr + row * s_o, offs, mask, eps, HIDDEN)


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, s_x, s_r, s_o, s_s, eps,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * s_x + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * s_r + offs, mask=mask, other=0.0).to(tl.float32)
    # Rounded to the sum's dtype before the norm reads it, as torch's add (fp32 math, one rounding) hands it on.
    s = (x + r).to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * s_s + offs, s, mask=mask)
    _store_normed(s, w_ptr, out_ptr + row * s_o, offs, mask, eps, HIDDEN)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, hidden] with a unit stride along hidden (copied only when it has none)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_args(hidden: int, device: torch.device) -> dict:
    return dict(HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden), num_warps=4 if hidden <= 4096 else 8,
                **pdl_launch_args(device))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (any leading shape); output dtype = result_type(weight, x)."""
    hidden = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    if x2.shape[0] == 0:
        return out
    out2 = out.view(-1, hidden)
    _rmsnorm_kernel[(x2.shape[0],)](
        x2, weight.contiguous(), out2, x2.stride(0), out2.stride(0), eps, **_launch_args(hidden, x.device),
    )
    return out


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual) in one pass over both inputs; x and residual have one shape.

    The sum has dtype result_type(x, residual), the norm result_type(weight, sum), as the unfused ops give.
    """
    if x.shape != residual.shape:
        raise ValueError(f"add_rmsnorm needs x and residual of one shape, got {tuple(x.shape)} and "
                         f"{tuple(residual.shape)}")
    hidden = x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)
    summed = torch.empty(x.shape, dtype=torch.result_type(x, residual), device=x.device)
    out = torch.empty(x.shape, dtype=torch.result_type(weight, summed), device=x.device)
    if x2.shape[0] == 0:
        return out, summed
    out2, sum2 = out.view(-1, hidden), summed.view(-1, hidden)
    _add_rmsnorm_kernel[(x2.shape[0],)](
        x2, r2, weight.contiguous(), out2, sum2, x2.stride(0), r2.stride(0), out2.stride(0), sum2.stride(0), eps,
        **_launch_args(hidden, x.device),
    )
    return out, summed
