"""Canonical gated MLP op `auto_deploy::torch_swiglu_mlp`: down(silu(gate x) * up x)."""

import torch
import torch.nn.functional as F


@torch.library.custom_op("auto_deploy::torch_swiglu_mlp", mutates_args=())
def torch_swiglu_mlp(
    input: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor
) -> torch.Tensor:
    """SwiGLU MLP with bias-free nn.Linear weights ([I, H], [I, H], [H, I])."""
    return F.linear(F.silu(F.linear(input, gate_weight)) * F.linear(input, up_weight), down_weight)


@torch_swiglu_mlp.register_fake
def _torch_swiglu_mlp_fake(
    input: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], down_weight.shape[0]))
