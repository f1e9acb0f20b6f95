"""Triton kernels of ad_runtime; importing this registers their ops as "triton" backends in the kernels registry."""

import torch
from ad_compiler.kernels_registry import register_kernel

from . import ops as _ops  # noqa: F401 - defines auto_deploy::triton_rmsnorm / triton_fused_add_rmsnorm / triton_rope_*

register_kernel("rmsnorm", "triton", torch.ops.auto_deploy.triton_rmsnorm.default)
register_kernel("add_rmsnorm", "triton", torch.ops.auto_deploy.triton_fused_add_rmsnorm.default)
register_kernel("rope", "triton", torch.ops.auto_deploy.triton_rope_with_cos_sin_cache.default)
