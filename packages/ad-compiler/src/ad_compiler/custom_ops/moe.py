"""Canonical routed-experts ops: `auto_deploy::torch_moe` (reference) and `torch_moe_fused` (grouped GEMMs)."""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"torch_moe: unknown act_fn {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _sort_by_expert(selected_experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token-slot indices (into the flattened [T*k]) routed to experts in [0, E), grouped by expert, and the
    slot count per expert. Other ids (experts owned by another rank) are left out: never computed."""
    flat = selected_experts.reshape(-1)
    order = torch.argsort(flat, stable=True)  # out-of-range ids sort to the ends
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.bincount(flat[valid], minlength=num_experts)[:num_experts]
    n_neg = int((flat < 0).sum())
    return order[n_neg : n_neg + int(counts.sum())], counts


@torch.library.custom_op("auto_deploy::torch_moe", mutates_args=())
def torch_moe(
    x: torch.Tensor,
    selected_experts: torch.Tensor,
    routing_weights: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    act_fn: str = "silu",
) -> torch.Tensor:
    """out[t] = sum_k w[t,k] * down_e(act(gate_e x[t]) * up_e x[t]), e = selected_experts[t,k].

    x [T, H]; selected_experts [T, k]; routing_weights [T, k]; gate_up_weight [E, 2I, H] (gate rows first);
    down_weight [E, H, I]. Loops over the experts that received tokens, like HF's eager experts.
    """
    act = get_activation(act_fn)
    num_experts, top_k = gate_up_weight.shape[0], selected_experts.shape[-1]
    out = torch.zeros_like(x)
    grouped, counts = _sort_by_expert(selected_experts, num_experts)
    flat_w = routing_weights.reshape(-1)
    for e, slots in enumerate(grouped.split(counts.tolist())):
        if len(slots) == 0:
            continue
        tokens = slots // top_k
        gate, up = F.linear(x[tokens], gate_up_weight[e]).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, down_weight[e]) * flat_w[slots, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


def _aligned(t: torch.Tensor) -> bool:
    # grouped_mm needs 16-byte aligned strides and storage offsets (checked on CPU too).
    n = 16 // t.element_size()
    return t.storage_offset() % n == 0 and all(s % n == 0 for s in t.stride() if s != 1)


def _grouped_mm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [M, K] rows grouped by expert, w [E, K, N] -> [M, N]; a per-expert loop where grouped_mm can't run."""
    a = a.contiguous()
    if _aligned(a) and _aligned(w):
        if hasattr(F, "grouped_mm"):
            return F.grouped_mm(a, w, offs=offs)
        if hasattr(torch, "_grouped_mm"):
            return torch._grouped_mm(a, w, offs=offs)
    out = a.new_empty((a.shape[0], w.shape[-1]))
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end] @ w[e]
        start = end
    return out


@torch.library.custom_op("auto_deploy::torch_moe_fused", mutates_args=())
def torch_moe_fused(
    x: torch.Tensor,
    selected_experts: torch.Tensor,
    routing_weights: torch.Tensor,
    gate_up_weight_t: torch.Tensor,
    down_weight_t: torch.Tensor,
    act_fn: str = "silu",
) -> torch.Tensor:
    """Same maths as torch_moe, with weights pre-transposed: gate_up_weight_t [E, H, 2I], down_weight_t [E, I, H].

    All token slots are gathered in expert order once and each projection is one grouped GEMM.
    """
    act = get_activation(act_fn)
    num_tokens, top_k = selected_experts.shape
    num_experts = gate_up_weight_t.shape[0]
    slots, counts = _sort_by_expert(selected_experts, num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[slots // top_k].to(gate_up_weight_t.dtype)
    gate, up = _grouped_mm(xs, gate_up_weight_t, offs).chunk(2, dim=-1)
    y = _grouped_mm(act(gate) * up, down_weight_t, offs)
    y = y * routing_weights.reshape(-1)[slots, None]
    # Back to slot order, then sum the k contributions of each token.
    per_slot = y.new_zeros((num_tokens * top_k, y.shape[-1]))
    per_slot[slots] = y
    return per_slot.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


def _moe_out(x: torch.Tensor, *_: object) -> torch.Tensor:
    """Both ops' fake: the output is x's shape and dtype whatever the routing and weights."""
    return torch.empty_like(x)


torch_moe.register_fake(_moe_out)
torch_moe_fused.register_fake(_moe_out)
