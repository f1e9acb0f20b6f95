"""Mamba mixers: in_proj split per chunk (z, x, B, C, dt), conv channels and per-head parameters with it."""

import logging
import operator

import torch
from torch.fx import GraphModule, Node

from .. import custom_ops  # noqa: F401 - torch.ops.auto_deploy.torch_causal_conv1d
from ..utils.graph_utils import get_attr_tensor, is_op
from .graph import linear_weight, module_name, param_target, regions, shape_of
from .plan import ShardEntry, ShardingPlan, ShardKind

logger = logging.getLogger(__name__)
aten = torch.ops.aten

# The mixer's depthwise conv: aten's, or the canonical op the hf_mamba2_ops export patch puts there.
_CONVS = [aten.conv1d, torch.ops.auto_deploy.torch_causal_conv1d]
# Ops that only move or cast data between the in_proj split, the conv and the conv split.
_PASS_THROUGH = [aten.transpose.int, aten.to.dtype, aten.to.dtype_layout, aten.contiguous, aten.permute]


def _follow(node: Node, want: list) -> Node | None:
    """The first node calling one of `want`, walking forward through pass-through ops and activations."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop(0)
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if is_op(u, want):
                return u
            if is_op(u, [*_PASS_THROUGH, aten.silu, aten.slice.Tensor]) or u.target is operator.getitem:
                todo.append(u)
    return None


def _param_through_views(node: object) -> str | None:
    """The parameter behind `node`, looking through squeeze/unsqueeze/casts (HF squeezes the conv weight)."""
    while isinstance(node, Node) and is_op(node, [aten.squeeze, aten.unsqueeze, aten.view, *_PASS_THROUGH]):
        node = node.args[0]
    return param_target(node)


def _getitem(split: Node, index: int) -> Node | None:
    return next((u for u in split.users if u.args[1] == index), None)


def mamba_entry(gm: GraphModule, in_proj: Node, world: int, source: str) -> ShardEntry | None:
    """The MAMBA entry for a Mamba2 in_proj, or None (with the reason logged) when it can't be split."""
    split = _follow(in_proj, [aten.split_with_sizes])
    if split is None or linear_weight(in_proj) is None:
        return None
    sizes = [int(s) for s in split.args[1]]
    conv = None
    for i, size in enumerate(sizes):
        item = _getitem(split, i)
        cand = _follow(item, _CONVS) if item is not None else None
        if cand is not None and _param_through_views(cand.args[1]):
            conv, xbc_index = cand, i
            break
    if conv is None:
        logger.warning("%s: no depthwise conv after the in_proj split; not a Mamba mixer", in_proj.name)
        return None
    conv_split = _follow(conv, [aten.split_with_sizes])
    if conv_split is None:
        return None
    x_size, bc_size, _ = (int(s) for s in conv_split.args[1])
    n_heads = sizes[-1]
    b_view = _follow(_getitem(conv_split, 1), [aten.view, aten.reshape])
    n_groups = shape_of(b_view)[-2] if b_view is not None else 1
    if n_heads % world or n_groups % world:
        logger.warning("%s: %d heads / %d groups do not divide world size %d", in_proj.name, n_heads, n_groups, world)
        return None
    chunks = [s for s in sizes[:xbc_index] if s] + [x_size, bc_size, bc_size] + [s for s in sizes[xbc_index + 1 :] if s]
    prefix = module_name(in_proj).rsplit(".", 1)[0] + "."
    params = {_param_through_views(conv.args[1]): (x_size, bc_size, bc_size)}
    if _param_through_views(conv.args[2]):
        params[_param_through_views(conv.args[2])] = (x_size, bc_size, bc_size)
    # Per-head (A_log, D, dt_bias) and gated-norm parameters of the same mixer, recognised by their size.
    for node in gm.graph.nodes:
        target = param_target(node)
        if not target or not target.startswith(prefix) or target in params or target.endswith("in_proj.weight"):
            continue
        shape = get_attr_tensor(gm, target).shape
        if len(shape) == 1 and shape[0] in (n_heads, x_size):
            params[target] = (shape[0],)
    return ShardEntry(
        in_proj.name, ShardKind.MAMBA, source, module_name(in_proj), tuple(chunks), 1, params,
        note=f"heads={n_heads} groups={n_groups}",
    )


def detect_ssm(gm: GraphModule, plan: ShardingPlan, source: str = "heuristic") -> int:
    """Regions holding a depthwise conv: its opening linear becomes MAMBA, its closing linear ROW."""
    claimed = 0
    for region in regions(gm):
        if not any(is_op(n, _CONVS) for n in region.nodes):
            continue
        if len(region.linears) != 2:
            continue
        in_proj, out_proj = region.linears
        entry = mamba_entry(gm, in_proj, plan.world_size, source)
        if entry is None or in_proj.name in plan.entries or out_proj.name in plan.entries:
            continue
        plan.claim(entry)
        plan.claim(ShardEntry(out_proj.name, ShardKind.ROW, source, module_name(out_proj)))
        claimed += 2
    return claimed
