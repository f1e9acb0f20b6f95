"""Custom ops over the Triton kernels: `auto_deploy::triton_rmsnorm`, `triton_fused_add_rmsnorm`, `triton_rope_*`,
`triton_gemv_linear`, `triton_gemv_swiglu` and `triton_add_rmsnorm_gemv` (one row: the GEMV; 2-64 rows: the
skinny GEMM where it beats cuBLAS; more: cuBLAS)."""

import os

import torch
from ad_compiler.kernels_registry import fused_add_rmsnorm_fake

from .triton import gemv as _gemv
from .triton import rmsnorm as _rmsnorm
from .triton import rope as _rope
from .triton import skinny_gemm as _skinny

# Kernels are reached through their modules (not imported names) so that switching Triton to its
# interpreter, which reloads those modules, takes effect here too.


@torch.library.custom_op("auto_deploy::triton_rmsnorm", mutates_args=())
def triton_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same contract as auto_deploy::torch_rmsnorm."""
    return _rmsnorm.rmsnorm(input, weight, eps)


@triton_rmsnorm.register_fake
def _triton_rmsnorm_fake(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return input.new_empty(input.shape, dtype=torch.result_type(weight, input))


@torch.library.custom_op("auto_deploy::triton_fused_add_rmsnorm", mutates_args=())
def triton_fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as auto_deploy::torch_fused_add_rmsnorm (the "add_rmsnorm" kernel of the registry)."""
    return _rmsnorm.add_rmsnorm(x, residual, weight, eps)


triton_fused_add_rmsnorm.register_fake(fused_add_rmsnorm_fake)  # the torch op's shapes and dtypes


@torch.library.custom_op("auto_deploy::triton_rope_with_cos_sin_cache", mutates_args=())
def triton_rope_with_cos_sin_cache(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, cos_sin_cache: torch.Tensor, unsqueeze_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as auto_deploy::torch_rope_with_cos_sin_cache (the "rope" kernel of the registry)."""
    return _rope.rope_with_cos_sin_cache(q, k, position_ids, cos_sin_cache, unsqueeze_dim)


@triton_rope_with_cos_sin_cache.register_fake
def _cache_fake(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, cos_sin_cache: torch.Tensor, unsqueeze_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        q.new_empty(q.shape, dtype=torch.result_type(q, cos_sin_cache)),
        k.new_empty(k.shape, dtype=torch.result_type(k, cos_sin_cache)),
    )


@torch.library.custom_op("auto_deploy::triton_gemv_linear", mutates_args=())
def triton_gemv_linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """aten.linear(input, weight, bias): a one-row input through the Triton GEMV, 2-64 rows of a 16-bit dtype
    through the Triton skinny GEMM (where it beats cuBLAS), more rows through aten (cuBLAS).

    The row count decides per call: captured decode graphs of small batches hold the Triton kernels, prefill and
    larger batches keep cuBLAS. Triton runs on a GPU, or on a CPU in its interpreter (TRITON_INTERPRET=1, the tests).
    """
    return _linear(input, weight, bias)


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """triton_gemv_linear's body (the fused op's many-row path calls it without a second dispatcher round trip)."""
    if _gemv_takes(input, weight):
        return _gemv.gemv(input, weight, bias)
    if _triton_runs(input) and _skinny.takes(input, weight):
        return _skinny.skinny_linear(input, weight, bias)
    return torch.ops.aten.linear.default(input, weight, bias)


def _triton_runs(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _gemv_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether x holds one row for the Triton GEMV (more rows take aten.linear)."""
    one_row = x.numel() == x.shape[-1] and weight.dim() == 2 and weight.stride(1) == 1
    return one_row and _triton_runs(x)


@triton_gemv_linear.register_fake
def _gemv_linear_fake(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.custom_op("auto_deploy::triton_gemv_swiglu", mutates_args=())
def triton_gemv_swiglu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(gate) * up of [gate | up] = aten.linear(input, weight, bias), weight the merged [gate; up] rows.

    One row: a single Triton GEMV launch that writes the activation (batch-1 decode); 2-64 rows of a 16-bit dtype:
    one skinny-GEMM launch that writes it. More rows: aten.linear (cuBLAS) and one Triton pass for the activation
    on a GPU, torch on a CPU.
    """
    return _linear_swiglu(input, weight, bias)


def _linear_swiglu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """triton_gemv_swiglu's body (also the fused op's many-row path)."""
    if _gemv_takes(input, weight):
        return _gemv.gemv_swiglu(input, weight, bias)
    if _triton_runs(input) and _skinny.takes(input, weight, swiglu=True):
        return _skinny.skinny_linear(input, weight, bias, swiglu=True)
    gate_up = torch.ops.aten.linear.default(input, weight, bias)
    if _triton_runs(gate_up):
        return _gemv.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@triton_gemv_swiglu.register_fake
def _gemv_swiglu_fake(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], weight.shape[0] // 2))


@torch.library.custom_op("auto_deploy::triton_add_rmsnorm_gemv", mutates_args=())
def triton_add_rmsnorm_gemv(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(triton_gemv_linear(n, weight, bias), x + residual), or triton_gemv_swiglu's product of n with `swiglu`,
    where (n, x + residual) = triton_fused_add_rmsnorm(x, residual, norm_weight, eps).

    One row: one Triton launch does the add, the norm and the GEMV (batch-1 decode). More rows: the add_rmsnorm
    kernel, then the linear as its op runs it (cuBLAS).
    """
    if _gemv_takes(x, weight):
        return _gemv.add_rmsnorm_gemv(x, residual, norm_weight, eps, weight, bias, swiglu)
    normed, summed = _rmsnorm.add_rmsnorm(x, residual, norm_weight, eps)
    return (_linear_swiglu if swiglu else _linear)(normed, weight, bias), summed


@triton_add_rmsnorm_gemv.register_fake
def _add_rmsnorm_gemv_fake(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = weight.shape[0] // 2 if swiglu else weight.shape[0]
    return x.new_empty((*x.shape[:-1], rows), dtype=weight.dtype), x.new_empty(x.shape)
