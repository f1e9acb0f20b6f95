"""Custom ops over the Triton kernels: `auto_deploy::triton_rmsnorm`, `triton_fused_add_rmsnorm`, `triton_rope_*`,
`triton_gemv_linear` and the GEMVs with a fused prologue (`triton_add_rmsnorm_gemv_linear`,
`triton_swiglu_gemv_linear`)."""

import os

import torch
from ad_compiler.kernels_registry import fused_add_rmsnorm_fake

from .triton import gemv as _gemv
from .triton import rmsnorm as _rmsnorm
from .triton import rope as _rope
from .triton import swiglu as _swiglu

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
    """aten.linear(input, weight, bias): a one-row input through the Triton GEMV, more rows through aten (cuBLAS).

    The row count decides per call: a captured batch-1 decode graph holds the GEMV, prefill and larger batches
    keep cuBLAS. Triton runs on a GPU, or on a CPU in its interpreter (TRITON_INTERPRET=1, the tests).
    """
    if _gemv_takes(input, input.shape[-1], weight):
        return _gemv.gemv(input, weight, bias)
    return torch.ops.aten.linear.default(input, weight, bias)


def _triton_runs(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _gemv_takes(x: torch.Tensor, row_features: int, weight: torch.Tensor) -> bool:
    """Whether x holds one row (of row_features) for the Triton GEMV; other calls take the unfused ops."""
    one_row = x.numel() == row_features and weight.dim() == 2 and weight.stride(1) == 1
    return one_row and _triton_runs(x)


@triton_gemv_linear.register_fake
def _gemv_linear_fake(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.custom_op("auto_deploy::triton_add_rmsnorm_gemv_linear", mutates_args=())
def triton_add_rmsnorm_gemv_linear(
    input: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(normed, weight, bias), summed) for normed, summed = the "add_rmsnorm" kernel of (input, residual,
    norm_weight, eps): one kernel for a one-row input (the GEMV normalises its row itself), else the Triton
    add_rmsnorm kernel and aten.linear."""
    if _gemv_takes(input, weight.shape[-1], weight):
        return _gemv.add_rmsnorm_gemv(input, residual, norm_weight, eps, weight, bias)
    if _triton_runs(input):
        normed, summed = _rmsnorm.add_rmsnorm(input, residual, norm_weight, eps)
    else:
        normed, summed = torch.ops.auto_deploy.torch_fused_add_rmsnorm(input, residual, norm_weight, eps)
    return torch.ops.aten.linear.default(normed, weight, bias), summed


@triton_add_rmsnorm_gemv_linear.register_fake
def _add_rmsnorm_gemv_fake(input, residual, norm_weight, eps, weight, bias):
    summed = input.new_empty(input.shape, dtype=torch.result_type(input, residual))
    return input.new_empty((*input.shape[:-1], weight.shape[0])), summed


@torch.library.custom_op("auto_deploy::triton_swiglu_gemv_linear", mutates_args=())
def triton_swiglu_gemv_linear(
    gate_up: torch.Tensor, gate_offset: int, up_offset: int, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """linear(silu(gate) * up, weight, bias), gate and up being the K features of gate_up at gate_offset and
    up_offset (K = weight's input features): one kernel for a one-row input, else a Triton SiLU-and-multiply
    kernel and aten.linear."""
    k = weight.shape[-1]
    if _gemv_takes(gate_up, gate_up.shape[-1], weight):
        return _gemv.swiglu_gemv(gate_up, gate_offset, up_offset, weight, bias)
    if _triton_runs(gate_up):
        act = _swiglu.silu_mul(gate_up, gate_offset, up_offset, k)
    else:
        gate = gate_up[..., gate_offset : gate_offset + k]
        act = torch.nn.functional.silu(gate) * gate_up[..., up_offset : up_offset + k]
    return torch.ops.aten.linear.default(act, weight, bias)


@triton_swiglu_gemv_linear.register_fake
def _swiglu_gemv_fake(gate_up, gate_offset, up_offset, weight, bias):
    return gate_up.new_empty((*gate_up.shape[:-1], weight.shape[0]))
