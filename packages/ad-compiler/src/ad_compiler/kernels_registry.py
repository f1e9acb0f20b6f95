"""Kernel backends for fused ops by (kernel, backend): torch here, triton/flashinfer from ad_runtime on import.

Every backend of a kernel is an op with the same signature, so transforms swap them blindly:

- "rmsnorm": `(input, weight, eps: float) -> Tensor`, HF Llama semantics (as `torch_rmsnorm`).
- "add_rmsnorm": `(x, residual, weight, eps: float) -> (normed, summed)`: `summed = x + residual` (the dtype
  aten's add gives), `normed` = the backend's "rmsnorm" of `summed` (a transformer layer's residual add + norm).
- "rope": `(q, k, position_ids, cos_sin_cache, unsqueeze_dim: int) -> (q, k)`, HF rotate-half semantics
  with `cos, sin = cache[position_ids].chunk(2, -1)` each repeated twice along the last dim
  (`cos_sin_cache` [max_pos, rotary_dim], cos half then sin half: flashinfer's layout); q/k [b, s, n, d]
  with unsqueeze_dim=2 or [b, n, s, d] with 1; the cache has the dtype the model's cos/sin had.
"""

from collections.abc import Callable

import torch

from .custom_ops.rmsnorm import hf_rms_normalize
from .errors import MissingBackendError
from .registry import Registry

KERNELS: tuple[str, ...] = ("rmsnorm", "add_rmsnorm", "rope")
# One registry of backends per kernel.
_BACKENDS: dict[str, Registry[Callable]] = {k: Registry(f"{k} kernel backend") for k in KERNELS}


def register_kernel(kernel: str, backend: str, impl: Callable, *, replace: bool = False) -> None:
    """Make `impl` the `backend` implementation of `kernel` (ad_runtime calls this for triton/flashinfer)."""
    if kernel not in _BACKENDS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    if backend == "auto":
        raise ValueError("'auto' is resolved at lookup time and cannot be registered")
    if not replace and _BACKENDS[kernel].entries.get(backend, impl) is not impl:
        raise ValueError(f"{kernel!r} already has a {backend!r} backend; pass replace=True to override it")
    _BACKENDS[kernel].add(backend, impl, replace=True)


def available_backends(kernel: str) -> list[str]:
    return sorted(_BACKENDS[kernel].entries) if kernel in _BACKENDS else []


def resolve_backend(kernel: str, backend: str = "auto") -> str:
    """'auto' means triton when CUDA is available and triton is registered, else torch."""
    if backend != "auto":
        return backend
    if torch.cuda.is_available() and "triton" in available_backends(kernel):
        return "triton"
    return "torch"


def get_kernel(kernel: str, backend: str = "auto") -> Callable:
    """The implementation of `kernel` for `backend`; MissingBackendError if nobody registered it."""
    if kernel not in _BACKENDS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")
    name = resolve_backend(kernel, backend)
    try:
        return _BACKENDS[kernel].entries[name]
    except KeyError:
        raise MissingBackendError(
            f"kernel backend {name!r} for {kernel!r} is not registered (have: "
            f"{', '.join(available_backends(kernel))}); install ad-runtime and `import ad_runtime` to register it."
        ) from None


# ---- the torch backend ------------------------------------------------------------------------


def _rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm: fp32 inside, then HF's cast-back and weight. On a GPU through aten's fused rms_norm kernel; on a
    CPU, where aten's rms_norm runs as about ten small ops, in HF's own four (61 norms a SmolLM2 decode step)."""
    # The weight is applied after the cast back, as HF does; passing it to rms_norm would scale in fp32.
    # (.to only where the dtype changes: a no-op .to still costs a dispatcher round trip, ~1-2 us on a CPU)
    x32 = input if input.dtype == torch.float32 else input.to(torch.float32)
    if x32.is_cuda:
        normed = torch.nn.functional.rms_norm(x32, (input.shape[-1],), None, eps)
    else:
        normed = hf_rms_normalize(x32, eps)
    return weight * (normed if normed.dtype == input.dtype else normed.to(input.dtype))


@torch.library.custom_op("auto_deploy::torch_rmsnorm_fused", mutates_args=())
def torch_rmsnorm_fused(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """torch_rmsnorm through aten's single rms_norm kernel (fp32 inside, then HF's cast-back and weight)."""
    return _rmsnorm(input, weight, eps)


@torch_rmsnorm_fused.register_fake
def _rmsnorm_fused_fake(input: torch.Tensor, weight: torch.Tensor, *_: object) -> torch.Tensor:
    return input.new_empty(input.shape, dtype=torch.result_type(weight, input))


@torch.library.custom_op("auto_deploy::torch_fused_add_rmsnorm", mutates_args=())
def torch_fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch_rmsnorm_fused(x + residual), x + residual): a residual add and the norm that reads it."""
    summed = x + residual
    return _rmsnorm(summed, weight, eps), summed


@torch_fused_add_rmsnorm.register_fake
def fused_add_rmsnorm_fake(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, *_: object) -> tuple:
    summed = x.new_empty(x.shape, dtype=torch.result_type(x, residual))
    return summed.new_empty(summed.shape, dtype=torch.result_type(weight, summed)), summed


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@torch.library.custom_op("auto_deploy::torch_rope_with_cos_sin_cache", mutates_args=())
def torch_rope_with_cos_sin_cache(
    q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor, cos_sin_cache: torch.Tensor, unsqueeze_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE reading cos/sin rows of a precomputed [max_pos, d] table at `position_ids` [b, s]."""
    cos_h, sin_h = cos_sin_cache[position_ids].chunk(2, dim=-1)
    cos = torch.cat((cos_h, cos_h), dim=-1).unsqueeze(unsqueeze_dim)
    sin = torch.cat((sin_h, sin_h), dim=-1).unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


@torch_rope_with_cos_sin_cache.register_fake
def _rope_cache_fake(q: torch.Tensor, k: torch.Tensor, _pos: torch.Tensor, cache: torch.Tensor, *_: object) -> tuple:
    return tuple(t.new_empty(t.shape, dtype=torch.result_type(t, cache)) for t in (q, k))


@torch.library.custom_op("auto_deploy::torch_cos_sin_table_lookup", mutates_args=())
def torch_cos_sin_table_lookup(
    position_ids: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [b, s, d] at `position_ids` from a [max_pos, d] table of cos and sin halves: what
    torch_rope_with_cos_sin_cache reads, for torch_rope_with_explicit_cos_sin (once per step, not per layer)."""
    cos_h, sin_h = cos_sin_cache[position_ids].chunk(2, dim=-1)
    return torch.cat((cos_h, cos_h), dim=-1), torch.cat((sin_h, sin_h), dim=-1)


@torch_cos_sin_table_lookup.register_fake
def _cos_sin_lookup_fake(position_ids: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*position_ids.shape, cos_sin_cache.shape[-1])
    return cos_sin_cache.new_empty(shape), cos_sin_cache.new_empty(shape)


register_kernel("rmsnorm", "torch", torch.ops.auto_deploy.torch_rmsnorm_fused.default)
register_kernel("add_rmsnorm", "torch", torch.ops.auto_deploy.torch_fused_add_rmsnorm.default)
register_kernel("rope", "torch", torch.ops.auto_deploy.torch_rope_with_cos_sin_cache.default)
