"""Expert parallelism over canonical MoE ops and batch splitting of bmm over stacked weights."""

import torch
from torch.fx import GraphModule, Node

from ..utils.graph_utils import get_attr_tensor, is_op
from .graph import module_name, param_target
from .plan import ShardEntry, ShardingPlan, ShardKind

aten = torch.ops.aten


def moe_ops() -> list:
    ad = getattr(torch.ops, "auto_deploy", None)
    return [getattr(ad, name) for name in ("torch_moe", "torch_moe_fused") if ad is not None and hasattr(ad, name)]


def moe_weights(node: Node) -> tuple[str, str] | None:
    """The stacked expert weights' attribute paths ([E, ...] each), if both are parameters."""
    gate_up, down = param_target(node.args[3]), param_target(node.args[4])
    return (gate_up, down) if gate_up and down else None


def detect_ep(gm: GraphModule, plan: ShardingPlan, source: str = "heuristic") -> int:
    """Each MoE node: a contiguous slice of E / world experts per rank."""
    claimed = 0
    for n in gm.graph.nodes:
        if not is_op(n, moe_ops()) or (targets := moe_weights(n)) is None:
            continue
        num_experts = get_attr_tensor(gm, targets[0]).shape[0]
        if num_experts % plan.world_size == 0:
            entry = ShardEntry(n.name, ShardKind.EXPERT, source, targets[0].rsplit(".", 2)[0], (num_experts,))
            claimed += plan.claim(entry)
    return claimed


def detect_bmm(gm: GraphModule, plan: ShardingPlan, source: str = "heuristic") -> int:
    """bmm(x, W) with W a stacked [B, K, N] parameter: each rank computes B / world batches."""
    claimed = 0
    for n in gm.graph.nodes:
        if not is_op(n, aten.bmm) or (target := param_target(n.args[1])) is None:
            continue
        batch = get_attr_tensor(gm, target).shape[0]
        if batch % plan.world_size == 0:
            claimed += plan.claim(ShardEntry(n.name, ShardKind.BMM, source, module_name(n), (batch,)))
    return claimed
