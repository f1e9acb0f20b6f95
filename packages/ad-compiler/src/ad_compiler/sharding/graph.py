"""Graph facts the sharding heuristics need: linears and their module names, residual regions, attention."""

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import size_hint as hint_int

from ..utils.graph_utils import get_attr_tensor, is_op

aten = torch.ops.aten


def is_linear(node: Node) -> bool:
    return is_op(node, aten.linear)


def param_target(node: Node | object) -> str | None:
    """The attribute path a get_attr argument reads, else None."""
    return node.target if isinstance(node, Node) and node.op == "get_attr" else None


def linear_weight(node: Node) -> str | None:
    return param_target(node.args[1])


def linear_bias(node: Node) -> str | None:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return param_target(bias)


def module_name(node: Node) -> str:
    """The owning module's path: from the weight's attribute path, else the innermost nn_module_stack entry."""
    for arg in node.args:
        target = param_target(arg)
        if target is not None:
            return target.rsplit(".", 1)[0]
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        # export names stack entries like "L['self'].model.layers[0]"; keep the dotted form
        return re.sub(r"\[(\d+)\]", r".\1", re.sub(r"^L\['self'\]\.?", "", str(path)))
    return ""


def in_numbered_layer(name: str) -> bool:
    """True for modules inside a repeated block (`...layers.3...`): the ones a plan must cover."""
    return any(part.isdigit() for part in name.split("."))


def attention_nodes(nodes: list[Node]) -> list[Node]:
    ops = [aten.scaled_dot_product_attention]
    if hasattr(torch.ops, "auto_deploy") and hasattr(torch.ops.auto_deploy, "torch_attention"):
        ops.append(torch.ops.auto_deploy.torch_attention)
    return [n for n in nodes if is_op(n, ops)]


def attention_heads(node: Node) -> tuple[int, int, int]:
    """(query heads, kv heads, head_dim) of an attention node from its input shapes."""
    q, k = node.args[0].meta["val"].shape, node.args[1].meta["val"].shape
    # layout is the 11th argument of torch_attention (after logit_cap)
    layout = node.kwargs.get("layout", node.args[10] if len(node.args) > 10 else "bnsd")
    head_axis = 2 if layout == "bsnd" else 1
    return hint_int(q[head_axis]), hint_int(k[head_axis]), hint_int(q[-1])


def shape_of(node: Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(hint_int(s) for s in val.shape)


def out_features(gm: GraphModule, lin: Node) -> int:
    return get_attr_tensor(gm, linear_weight(lin)).shape[0]


def _split_dim(node: Node) -> bool:
    """True if a split/chunk node splits the last dim of its input."""
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    ndim = len(shape_of(node.args[0]) or ())
    return dim == -1 or dim == ndim - 1


def output_chunks(lin: Node, total: int) -> tuple[int, ...]:
    """Chunk sizes when a linear's output is split right away (fused q/k/v or gate/up), else (total,)."""
    for user in lin.users:
        if not _split_dim(user) if is_op(user, [aten.split_with_sizes, aten.chunk, aten.split.Tensor]) else True:
            continue
        if is_op(user, aten.split_with_sizes):
            sizes = tuple(int(s) for s in user.args[1])
            if sum(sizes) == total:
                return tuple(s for s in sizes if s)
        elif is_op(user, aten.chunk) and total % int(user.args[1]) == 0:
            n = int(user.args[1])
            return (total // n,) * n
        elif isinstance(user.args[1], int) and total % int(user.args[1]) == 0:
            size = int(user.args[1])
            return (size,) * (total // size)
    return (total,)


@dataclass
class Region:
    """The nodes between two consecutive residual-stream nodes (exclusive of both ends)."""

    start: Node
    end: Node
    nodes: list[Node] = field(default_factory=list)

    @property
    def linears(self) -> list[Node]:
        return [n for n in self.nodes if is_linear(n)]


def _topo_index(gm: GraphModule) -> dict[Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


_CASTS = [aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy]


def _stream_aliases(node: Node) -> list[Node]:
    """No-op dtype casts of a stream node (e.g. RMSNorm's .to(float32)): they stand in for the node itself."""
    return [u for u in node.users if is_op(u, _CASTS) and shape_of(u) == shape_of(node)]


def residual_stream(gm: GraphModule) -> list[Node]:
    """Embedding output, then each add that takes the previous stream node and keeps its shape."""
    index = _topo_index(gm)
    emb = next((n for n in gm.graph.nodes if is_op(n, aten.embedding)), None)
    if emb is None:
        return []
    stream = [emb]
    while True:
        cur = stream[-1]
        aliases = [cur, *_stream_aliases(cur)]
        adds = [
            u
            for a in aliases
            for u in a.users
            if is_op(u, aten.add.Tensor)
            and all(isinstance(a, Node) for a in u.args[:2])
            and shape_of(u) == shape_of(cur)
        ]
        if not adds:
            return stream
        stream.append(min(adds, key=index.__getitem__))


def regions(gm: GraphModule) -> list[Region]:
    """Nodes on a path from one stream node to the next, per layer half (attention, MLP, mixer)."""
    index = _topo_index(gm)
    stream = residual_stream(gm)
    out = []
    for start, end in zip(stream, stream[1:]):
        lo, hi = index[start], index[end]
        fwd = _reach(start, lambda n: n.users, lambda n: index[n] < hi)
        back = _reach(end, lambda n: n.all_input_nodes, lambda n: index[n] > lo)
        # A cast of the stream that feeds the residual add is the stream, not part of the layer's computation.
        nodes = sorted((fwd & back) - set(_stream_aliases(start)), key=index.__getitem__)
        out.append(Region(start, end, nodes))
    return out


def _reach(node: Node, step: Callable[[Node], Iterable[Node]], keep: Callable[[Node], bool]) -> set[Node]:
    """Nodes reachable from `node` (itself excluded) through `step`, walking only over nodes that `keep` accepts."""
    seen: set[Node] = set()
    todo = [node]
    while todo:
        for n in step(todo.pop()):
            if n not in seen and keep(n):
                seen.add(n)
                todo.append(n)
    return seen


def descendants(node: Node, within: set[Node]) -> set[Node]:
    return _reach(node, lambda n: n.users, within.__contains__)


def ancestors(node: Node, within: set[Node]) -> set[Node]:
    return _reach(node, lambda n: n.all_input_nodes, within.__contains__)
