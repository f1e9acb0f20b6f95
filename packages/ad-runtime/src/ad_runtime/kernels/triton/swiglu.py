"""Triton SiLU-and-multiply of the gate and up halves of a gate_up row (the rows a fused GEMV does not take)."""

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda

from .pdl import pdl_launch_args


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr, s_x, s_o, gate_off, up_off, K,
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < K
    g = tl.load(x_ptr + row * s_x + gate_off + offs, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    u = tl.load(x_ptr + row * s_x + up_off + offs, mask=ok, other=0.0).to(tl.float32)
    # One rounding, as Inductor's fused silu-mul kernel (eager rounds after the silu too).
    tl.store(out_ptr + row * s_o + offs, (gf / (1.0 + tl.exp(-gf)) * u).to(g.dtype), mask=ok)


def silu_mul(gate_up: torch.Tensor, gate_off: int, up_off: int, k: int) -> torch.Tensor:
    """silu(gate_up[..., gate_off:gate_off+k]) * gate_up[..., up_off:up_off+k], shape [..., k]."""
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty((*gate_up.shape[:-1], k), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] == 0 or k == 0:
        return out
    out2 = out.view(-1, k)
    block = min(1024, triton.next_power_of_2(k))
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(k, block))](
        rows, out2, rows.stride(0), out2.stride(0), gate_off, up_off, k,
        BLOCK=block, num_warps=4, **pdl_launch_args(gate_up.device),
    )
    return out
