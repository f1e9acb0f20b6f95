"""Match Hugging Face routed-experts blocks (Mixtral, Qwen2/3-MoE) into one torch_moe node.

Before (transformers 5.17, any exportable experts implementation: grouped_mm, batched_mm):
    logits = linear(x, router_w); probs = softmax(logits); w, idx = topk(probs, k); [w = w / w.sum(); w.to()]
    out = <sort / gather / grouped_mm or bmm over experts.gate_up_proj [E,2I,H] and experts.down_proj [E,H,I]
           / act(gate) * up / * w / scatter / sum over k>
After:
    out = torch_moe(x, idx, w, gate_up_proj, down_proj, act_fn)
Shared experts (Qwen2-MoE) do not depend on the routing, so they stay ordinary linears outside the match.
HF's "eager" experts loop over data-dependent expert ids and cannot be exported; the model factory must
pick an exportable implementation (config._experts_implementation = "grouped_mm", the default).
"""

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ... import custom_ops  # noqa: F401 - registers torch.ops.auto_deploy.*
from ...models.factory import ModelFactory
from ...utils.graph_utils import fake, get_attr_tensor, is_op, nodes_calling, same_size, val
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default)
# Ops that only reshape or replicate rows: the experts may read x through them (batched_mm repeats rows).
_VIEWS = (
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.repeat_interleave.self_int, aten.contiguous.default, aten.clone.default, aten.unsqueeze.default,
    aten.expand.default,
)
# Longest experts subgraph we are willing to walk (grouped_mm export is ~50 nodes per block).
_MAX_REGION = 400


@dataclass
class MoeMatch:
    """Everything torch_moe needs, plus the node it replaces and the subgraph it makes dead."""

    x: Node
    selected: Node
    weights: Node
    gate_up: Node
    down: Node
    act_fn: str
    exit: Node
    region: list[Node]


def _same_shape(a: Node, b: Node) -> bool:
    va, vb = fake(a), fake(b)
    # Symbolic sizes compare by expression: T*k and T must not be confused.
    return va is not None and vb is not None and va.dim() == vb.dim() and all(map(same_size, va.shape, vb.shape))


def _uncast(n: Any) -> Any:
    while isinstance(n, Node) and is_op(n, _CASTS):
        n = n.args[0]
    return n


def _softmax_input(topk: Node) -> Node | None:
    """The router logits feeding `topk(softmax(logits))` (casts allowed on either side), else None."""
    n = _uncast(topk.args[0])
    if not isinstance(n, Node) or not is_op(n, (aten.softmax.int, aten._softmax.default)):
        return None
    logits = _uncast(n.args[0])
    return logits if isinstance(logits, Node) and is_op(logits, aten.linear.default) else None


def _getitem(node: Node, idx: int) -> Node | None:
    return next((u for u in node.users if u.target is operator.getitem and u.args[1] == idx), None)


def _routing_weights(values: Node) -> tuple[Node, set[Node]]:
    """Follow topk values through normalisation (w / w.sum(-1)) and casts; (final weights, chain nodes)."""
    chain = {values}
    cur = values
    while True:
        nxt = None
        for u in cur.users:
            if is_op(u, (aten.div.Tensor, aten.div_.Tensor)) and u.args[0] is cur:
                den = u.args[1]
                if isinstance(den, Node) and is_op(den, aten.sum.dim_IntList) and den.args[0] is cur:
                    chain.add(den)
                    nxt = u
            elif is_op(u, _CASTS) and len(cur.users) == 1:
                nxt = u
        if nxt is None:
            return cur, chain
        chain.add(nxt)
        cur = nxt


def _activation(nodes: list[Node]) -> str | None:
    acts = []
    for n in nodes:
        if is_op(n, aten.silu.default):
            acts.append("silu")
        elif is_op(n, aten.gelu.default):
            acts.append("gelu_tanh" if n.kwargs.get("approximate", "none") == "tanh" else "gelu")
        elif is_op(n, aten.relu.default):
            acts.append("relu")
    return acts[0] if len(acts) == 1 else None


# How the experts implementations present the stacked weights to grouped_mm / bmm.
_WEIGHT_VIEWS = (aten.transpose.int, aten.permute.default, aten.t.default, aten.contiguous.default)


def _param_of(node: Node) -> Node | None:
    """The get_attr behind `node` through transposes, else None."""
    while is_op(node, _WEIGHT_VIEWS) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node if node.op == "get_attr" else None


def _outside_inputs(region: list[Node]) -> list[Node]:
    """What the region reads from outside, not counting the router probabilities that feed topk (region[0])."""
    inside = set(region)
    return list(dict.fromkeys(a for n in region[1:] for a in n.all_input_nodes if a not in inside))


def _base(node: Node) -> Node:
    while is_op(node, _VIEWS) and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _experts_region(topk: Node, x: Node) -> tuple[Node, list[Node]] | None:
    """The first node after `topk` that every routed computation flows into, shaped like x; and the region.

    Walking in graph order, a node joins the region if it consumes a region node. The exit is the first
    region node shaped [T, H] at which no region node has a consumer outside the region.
    """
    region: set[Node] = {topk}
    ordered = [topk]
    pending: set[Node] = set(topk.users)
    n = topk.next
    for _ in range(_MAX_REGION):
        if n.op == "output":
            return None
        if n in pending or any(a in region for a in n.all_input_nodes):
            region.add(n)
            ordered.append(n)
            pending.discard(n)
            if not pending and _same_shape(n, x):
                return n, ordered
            pending |= {u for u in n.users if u not in region}
        n = n.next
    return None


def _inputs_ok(region: list[Node], x: Node) -> bool:
    """Besides parameters, the region reads only x (through views) and tensors built from sizes (arange)."""
    for a in _outside_inputs(region):
        if not isinstance(val(a), torch.Tensor) or _param_of(a) is not None:
            continue  # SymInt sizes
        if _base(a) is _base(x):
            continue
        if not any(isinstance(val(b), torch.Tensor) for b in a.all_input_nodes):
            continue
        return False
    return True


def match_moe(gm: GraphModule, topk: Node) -> MoeMatch | None:
    logits = _softmax_input(topk)
    values, indices = _getitem(topk, 0), _getitem(topk, 1)
    if logits is None or values is None or indices is None:
        return None
    x = logits.args[0]  # the router and the experts read the same hidden states [T, H]
    if not isinstance(x, Node) or not isinstance(val(x), torch.Tensor) or val(x).dim() != 2:
        return None
    found = _experts_region(topk, x)
    if found is None:
        return None
    exit_node, region = found
    weights, chain = _routing_weights(values)
    # Tensors flowing into the region from outside: x (maybe through views), two stacked 3-D parameters.
    params = list(dict.fromkeys(p for a in _outside_inputs(region) if (p := _param_of(a)) is not None))
    if len(params) != 2 or any(get_attr_tensor(gm, p.target).dim() != 3 for p in params):
        return None
    gate_up, down = params  # graph order: gate_up is used first
    gu, dn = get_attr_tensor(gm, gate_up.target), get_attr_tensor(gm, down.target)
    if gu.shape[0] != dn.shape[0] or gu.shape[1] != 2 * dn.shape[2] or gu.shape[2] != dn.shape[1]:
        return None
    act = _activation(region)
    if act is None or not _inputs_ok(region, x):
        return None
    return MoeMatch(x, indices, weights, gate_up, down, act, exit_node, [n for n in region if n not in chain])


def _rewrite(gm: GraphModule, m: MoeMatch) -> None:
    graph = gm.graph
    with graph.inserting_before(m.exit):
        moe = graph.call_function(
            torch.ops.auto_deploy.torch_moe.default, (m.x, m.selected, m.weights, m.gate_up, m.down, m.act_fn)
        )
    if isinstance(val(m.x), torch.Tensor):
        moe.meta["val"] = val(m.x)  # same shape, dtype and device as the op's output
    moe.meta["nn_module_stack"] = m.exit.meta.get("nn_module_stack", {})
    m.exit.replace_all_uses_with(moe)
    # In-place nodes (clamp_, index_put_) and metadata asserts have no users but count as side effects;
    # drop the whole dead region ourselves, consumers first.
    for n in reversed(m.region):
        if n is not moe and not n.users and n.op == "call_function":
            graph.erase_node(n)


@TransformRegistry.register("match_moe_pattern")
class MatchMoePattern(BaseTransform):
    """Replace each softmax-top-k routed experts block by torch_moe."""

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        num = 0
        for topk in nodes_calling(gm, aten.topk):
            m = match_moe(gm, topk)
            if m is None:
                continue
            _rewrite(gm, m)
            num += 1
        if num:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return gm, TransformInfo(num_matches=num)
