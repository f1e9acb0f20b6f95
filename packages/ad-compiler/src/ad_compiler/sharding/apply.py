"""Apply a sharding plan: local weight shards, collectives, load hooks; then repair shape literals."""

import logging

import torch
import torch.nn as nn
from torch.fx import GraphModule, Node

from ..errors import CompileError
from ..utils.graph_utils import get_attr_tensor, run_shape_prop
from .graph import linear_bias, linear_weight, out_features, param_target
from .load_hooks import register_shard_load_hook
from .plan import ShardEntry, ShardingPlan, ShardKind, ShardSpec
from .repair import repair_shapes

logger = logging.getLogger(__name__)
aten = torch.ops.aten


def _ad_op(name: str):
    import ad_compiler.custom_ops  # noqa: F401 - registers the collectives

    return getattr(torch.ops.auto_deploy, name).default


def _set_attr(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    owner_name, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if isinstance(getattr(owner, attr), nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=False))
    else:
        owner.register_buffer(attr, value, persistent=attr not in getattr(owner, "_non_persistent_buffers_set", ()))


class ShardApplier:
    """Edits one GraphModule for one rank; remembers each sharded tensor's spec for the load hook."""

    def __init__(self, gm: GraphModule, plan: ShardingPlan, rank: int):
        self.gm, self.plan, self.rank, self.world = gm, plan, rank, plan.world_size
        self.specs: dict[str, tuple[tuple[int, ...], ShardSpec]] = {}
        self.nodes = {n.name: n for n in gm.graph.nodes}

    def shard_param(self, target: str, dim: int, chunks: tuple[int, ...]) -> None:
        if target in self.specs:
            return  # a weight shared by two nodes (tied) is cut once
        full = get_attr_tensor(self.gm, target)
        spec = ShardSpec(dim, chunks, self.rank, self.world)
        if not spec.divides():
            raise CompileError(f"cannot split {target} {tuple(full.shape)} dim {dim} chunks {chunks} into {self.world}")
        self.specs[target] = (tuple(full.shape), spec)
        _set_attr(self.gm, target, spec.slice(full))

    def _insert_after(self, node: Node, op, *extra) -> Node:
        """Insert `op(node, *extra)` right after `node` and route every other user of `node` to it."""
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_function(op, (node, *extra))
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        return new

    def apply(self, entry: ShardEntry) -> None:
        node = self.nodes[entry.node]
        getattr(self, f"_apply_{entry.kind.value}")(node, entry)

    def _apply_column(self, node: Node, entry: ShardEntry) -> None:
        chunks = entry.chunks or (out_features(self.gm, node),)
        self.shard_param(linear_weight(node), 0, chunks)
        if bias := linear_bias(node):
            self.shard_param(bias, 0, chunks)

    def _apply_simple(self, node: Node, entry: ShardEntry) -> None:
        # One contiguous split: the gather puts the rank pieces back in their original order.
        self._apply_column(node, ShardEntry(entry.node, entry.kind, entry.source))
        self._insert_after(node, _ad_op("torch_dist_all_gather"), -1)

    def _apply_row(self, node: Node, entry: ShardEntry) -> None:
        weight = linear_weight(node)
        self.shard_param(weight, 1, (get_attr_tensor(self.gm, weight).shape[1],))
        reduced = self._insert_after(node, _ad_op("torch_dist_all_reduce"))
        bias = node.args[2] if len(node.args) > 2 else None
        if bias is not None:
            # The bias is added once, after the sum over ranks.
            node.args = (node.args[0], node.args[1], None)
            self._insert_after(reduced, aten.add.Tensor, bias)

    def _apply_expert(self, node: Node, entry: ShardEntry) -> None:
        num_experts = entry.chunks[0]
        for arg in node.args[3:5]:
            self.shard_param(param_target(arg), 0, (num_experts,))
        start = self.rank * (num_experts // self.world)
        # Ids of experts owned by other ranks fall outside [0, E/world): the MoE op skips them.
        with self.gm.graph.inserting_before(node):
            local_ids = self.gm.graph.call_function(aten.sub.Tensor, (node.args[1], start))
        node.args = (node.args[0], local_ids, *node.args[2:])
        self._insert_after(node, _ad_op("torch_dist_all_reduce"))

    def _apply_bmm(self, node: Node, entry: ShardEntry) -> None:
        batch = entry.chunks[0]
        self.shard_param(param_target(node.args[1]), 0, (batch,))
        per_rank = batch // self.world
        with self.gm.graph.inserting_before(node):
            x = self.gm.graph.call_function(
                aten.slice.Tensor, (node.args[0], 0, self.rank * per_rank, (self.rank + 1) * per_rank)
            )
        node.args = (x, node.args[1])
        self._insert_after(node, _ad_op("torch_dist_all_gather"), 0)

    def _apply_mamba(self, node: Node, entry: ShardEntry) -> None:
        self._apply_column(node, entry)
        for target, chunks in entry.params.items():
            self.shard_param(target, 0, chunks)


def apply_plan(gm: GraphModule, plan: ShardingPlan, rank: int) -> int:
    """Shard `gm` in place for `rank`; returns the number of entries applied."""
    if plan.world_size == 1 or not plan.entries:
        return 0
    if any(not isinstance(n.meta.get("val"), torch.Tensor) for n in gm.graph.nodes if n.op == "placeholder"):
        run_shape_prop(gm)  # the repair pass needs the pre-sharding shapes
    applier = ShardApplier(gm, plan, rank)
    for entry in plan.entries.values():
        applier.apply(entry)
    gm.graph.lint()
    gm.recompile()
    repair_shapes(gm, plan.world_size)
    register_shard_load_hook(gm, applier.specs)
    return len(plan.entries)
