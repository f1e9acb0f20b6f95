"""Heuristic tensor parallelism: column-split the linears that open a residual region, row-split the one closing it."""

import logging

import torch
from torch.fx import GraphModule, Node

from .. import custom_ops as _custom_ops  # noqa: F401  (registers the canonical ops named below)
from ..utils.graph_utils import get_attr_tensor, is_op
from .graph import (
    Region,
    ancestors,
    attention_heads,
    attention_nodes,
    descendants,
    is_linear,
    linear_bias,
    linear_weight,
    module_name,
    out_features,
    output_chunks,
    param_target,
    regions,
)
from .plan import ShardEntry, ShardingPlan, ShardKind

logger = logging.getLogger(__name__)
aten = torch.ops.aten

# Ops whose parameters or semantics tie them to the feature layout; a region using them is not split by heads.
# The canonical Mamba conv and scan are split only by the ssm heuristic or a manual "mamba" plan.
_LAYOUT_BOUND_OPS = [aten.conv1d, aten.conv2d, aten.convolution, torch.ops.auto_deploy.torch_causal_conv1d,
                     torch.ops.auto_deploy.torch_ssm, torch.ops.auto_deploy.torch_gated_delta_rule,
                     torch.ops.auto_deploy.torch_linear_attention]


def _linear_depth(region: Region) -> dict[Node, int]:
    """Number of region linears on the longest path from the region start to each node (exclusive)."""
    inside = set(region.nodes)
    depth: dict[Node, int] = {}
    for n in region.nodes:
        depth[n] = max((depth[a] + int(is_linear(a)) for a in n.all_input_nodes if a in inside), default=0)
    return depth


def _tp_decision(gm: GraphModule, region: Region, world: int) -> tuple[dict[Node, ShardEntry], str] | None:
    """Entries for one region: column/row when the region allows it, simple when it does not, None to skip."""
    lins = [n for n in region.linears if linear_weight(n) is not None]
    if not lins or len(lins) != len(region.linears):
        return None
    depth = _linear_depth(region)
    openers = [n for n in lins if depth[n] == 0]
    closers = [n for n in lins if depth[n] > 0]
    if not openers or len(closers) != 1 or depth[closers[0]] != 1:
        return None  # not an open/close region (e.g. a router only): nothing to decide here
    closer = closers[0]
    inside = set(region.nodes)
    if not inside <= ancestors(closer, inside) | descendants(closer, inside) | {closer}:
        return None  # some opener's output reaches the residual add without passing the closer
    inner = set().union(*(descendants(o, inside) for o in openers)) & ancestors(closer, inside)
    reason = ""
    unit = 1
    for attn in attention_nodes(sorted(inner, key=region.nodes.index)):
        n_q, n_kv, head_dim = attention_heads(attn)
        unit = head_dim
        if n_q % world or n_kv % world:
            reason = f"heads {n_q}/{n_kv} do not divide world size {world}"
    weights = {t for n in lins for t in (linear_weight(n), linear_bias(n)) if t}
    for n in inner:
        if is_op(n, _LAYOUT_BOUND_OPS):
            reason = reason or f"{n.name} depends on the feature layout"
        for a in n.all_input_nodes:
            target = param_target(a)
            if target and target not in weights and any(d not in (1, unit) for d in get_attr_tensor(gm, target).shape):
                reason = reason or f"parameter {target} depends on the feature layout"
    entries: dict[Node, ShardEntry] = {}
    for o in openers:
        chunks = output_chunks(o, out_features(gm, o))
        if any(c % (world * unit) for c in chunks):
            reason = reason or f"{o.name} output {list(chunks)} does not split into {world} x {unit}"
        entries[o] = ShardEntry(o.name, ShardKind.COLUMN, "heuristic", module_name(o), chunks, unit)
    if get_attr_tensor(gm, linear_weight(closer)).shape[1] % world:
        reason = reason or f"{closer.name} input does not split into {world}"
    entries[closer] = ShardEntry(closer.name, ShardKind.ROW, "heuristic", module_name(closer))
    if reason:
        entries = {
            n: ShardEntry(n.name, ShardKind.SIMPLE, "heuristic", module_name(n), note="fallback")
            for n in lins
            if out_features(gm, n) % world == 0
        }
    return entries, reason


def detect_tp(gm: GraphModule, plan: ShardingPlan) -> int:
    """Claim column/row (or simple) entries per residual region; regions another source decided differently stay."""
    claimed = 0
    for region in regions(gm):
        decided = _tp_decision(gm, region, plan.world_size)
        if decided is None:
            continue
        entries, reason = decided
        if reason:
            logger.info("region before %s: simple sharding (%s)", region.end.name, reason)
        clash = [n for n, e in entries.items() if n.name in plan.entries and plan.entries[n.name].kind != e.kind]
        if clash:
            logger.info("region before %s: left as claimed by earlier sources", region.end.name)
            continue
        claimed += sum(plan.claim(e) for e in entries.values())
    return claimed


def detect_simple(gm: GraphModule, plan: ShardingPlan, source: str = "heuristic") -> int:
    """Every linear with a divisible output: column split, then all-gather (simple_shard_only)."""
    claimed = 0
    for n in gm.graph.nodes:
        if is_linear(n) and linear_weight(n) and out_features(gm, n) % plan.world_size == 0:
            claimed += plan.claim(ShardEntry(n.name, ShardKind.SIMPLE, source, module_name(n)))
    return claimed
