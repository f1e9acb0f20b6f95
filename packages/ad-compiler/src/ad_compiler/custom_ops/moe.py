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


def _sort_by_expert(selected_experts: torch.Tensor, num_experts: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(every token slot, i.e. index into the flattened [T*k], in expert order; the expert of each sorted slot; the
    slot count per expert). Ids outside [0, E) (experts owned by another rank) become E: sorted last, never
    computed. No host sync and shapes fixed by T*k, so a CUDA graph can capture it."""
    flat = selected_experts.reshape(-1).to(torch.int64)
    ids = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    order = torch.argsort(ids, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    return order, ids[order], counts[:num_experts]


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
    if _capturing(x):  # a CUDA graph cannot hold the host loop below: the grouped maths on transposed views
        return _moe_grouped(x, selected_experts, routing_weights, gate_up_weight.transpose(1, 2),
                            down_weight.transpose(1, 2), act_fn)
    act = get_activation(act_fn)
    num_experts, top_k = gate_up_weight.shape[0], selected_experts.shape[-1]
    out = torch.zeros_like(x)
    order, _, counts = _sort_by_expert(selected_experts, num_experts)
    flat_w = routing_weights.reshape(-1)
    # The host loop reads the group sizes (a sync): fine outside a capture.
    for e, slots in enumerate(order[: int(counts.sum())].split(counts.tolist())):
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


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _graph_safe_grouped_mm(a_cols: int, b_cols: int, *ws: torch.Tensor) -> bool:
    """Whether torch's grouped_mm runs, without a host sync, on activations of these widths and these weights: its
    CUTLASS kernels (bf16 on sm90/sm100) read the offsets on the device; its fallback for other dtypes and GPUs
    copies them to the host first, and our loop (unaligned shapes) reads them too."""
    n = 16 // ws[0].element_size()
    return (
        all(w.dtype == torch.bfloat16 and _aligned(w) for w in ws) and a_cols % n == 0 and b_cols % n == 0
        and torch.cuda.get_device_capability(ws[0].device)[0] in (9, 10)
    )


def _grouped_mm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [M, K] rows grouped by expert, w [E, K, N] -> [M, N] (rows past offs[-1] undefined); grouped_mm where it
    can run, else a per-expert loop (its group sizes read on the host)."""
    a = a.contiguous()
    grouped = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if grouped is not None and _aligned(a) and _aligned(w):
        return grouped(a, w, offs=offs)
    out = a.new_empty((a.shape[0], w.shape[-1]))
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end] @ w[e]
        start = end
    return out


# Token x expert products a captured dense MoE may compute (every expert over every token: E/k times the routed
# work). A decode graph of 256 rows of a 128-expert model fits; an 8,192-token piecewise prefill piece of such a
# model does not: its capture fails and the piece runs eagerly with the grouped GEMMs (the piecewise fallback).
DENSE_CAPTURE_MAX_PRODUCTS = 256 * 128


def _moe_dense(x: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor,
               gate_up_weight_t: torch.Tensor, down_weight_t: torch.Tensor, act) -> torch.Tensor:
    """Every expert over every token, each weighted by the token's routing weight for it (0 where not routed, and
    for other ranks' experts): no host sync and no data-dependent shape, for a CUDA graph where grouped_mm syncs."""
    num_tokens, num_experts = x.shape[0], gate_up_weight_t.shape[0]
    if num_tokens * num_experts > DENSE_CAPTURE_MAX_PRODUCTS:
        raise RuntimeError(
            f"torch_moe in a CUDA graph: {num_tokens} tokens x {num_experts} experts would each be computed "
            f"(grouped_mm syncs for {gate_up_weight_t.dtype} on this GPU); run this step without a graph"
        )
    experts = torch.arange(num_experts, device=x.device)
    per_expert = ((selected_experts[..., None] == experts) * routing_weights[..., None]).sum(dim=1)  # [T, E]
    xs = x.to(gate_up_weight_t.dtype)
    out = torch.zeros(xs.shape, dtype=torch.promote_types(xs.dtype, routing_weights.dtype), device=x.device)
    for e in range(num_experts):
        gate, up = (xs @ gate_up_weight_t[e]).chunk(2, dim=-1)
        out = out + per_expert[:, e, None] * ((act(gate) * up) @ down_weight_t[e])
    return out.to(x.dtype)


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
    return _moe_grouped(x, selected_experts, routing_weights, gate_up_weight_t, down_weight_t, act_fn)


def _moe_grouped(x: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor,
                 gate_up_weight_t: torch.Tensor, down_weight_t: torch.Tensor, act_fn: str) -> torch.Tensor:
    """torch_moe_fused's body (torch_moe's too while a CUDA graph captures)."""
    act = get_activation(act_fn)
    num_tokens, top_k = selected_experts.shape
    num_experts = gate_up_weight_t.shape[0]
    if _capturing(x) and not _graph_safe_grouped_mm(x.shape[-1], down_weight_t.shape[1], gate_up_weight_t,
                                                     down_weight_t):
        return _moe_dense(x, selected_experts, routing_weights, gate_up_weight_t, down_weight_t, act)
    order, experts, counts = _sort_by_expert(selected_experts, num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // top_k].to(gate_up_weight_t.dtype)
    gate, up = _grouped_mm(xs, gate_up_weight_t, offs).chunk(2, dim=-1)
    y = _grouped_mm(act(gate) * up, down_weight_t, offs)
    # Slots of other ranks' experts (sorted last, their rows undefined) contribute zeros: a select, not a product,
    # so whatever those rows hold never reaches the sum.
    y = torch.where((experts < num_experts)[:, None], y * routing_weights.reshape(-1)[order, None], 0)
    # Back to slot order (order is a permutation of every slot), then sum the k contributions of each token.
    per_slot = torch.empty_like(y)
    per_slot[order] = y
    return per_slot.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


def _moe_out(x: torch.Tensor, *_: object) -> torch.Tensor:
    """Both ops' fake: the output is x's shape and dtype whatever the routing and weights."""
    return torch.empty_like(x)


torch_moe.register_fake(_moe_out)
torch_moe_fused.register_fake(_moe_out)
