"""Canonical RMSNorm op `auto_deploy::torch_rmsnorm` with Hugging Face Llama semantics."""

import torch


def hf_rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, as HF Llama computes it (x already in fp32)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.library.custom_op("auto_deploy::torch_rmsnorm", mutates_args=())
def torch_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Variance in fp32, normalise, cast back to the input dtype, then scale by `weight`."""
    return weight * hf_rms_normalize(input.to(torch.float32), eps).to(input.dtype)


@torch_rmsnorm.register_fake
def _torch_rmsnorm_fake(input: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return input.new_empty(input.shape, dtype=torch.result_type(weight, input))
