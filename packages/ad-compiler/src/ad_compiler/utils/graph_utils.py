"""The FX toolkit every transform uses: op checks, node and argument helpers, clean-up, shape propagation and
graph inputs (one copy of each; transforms never import helpers from each other)."""

import sys
from collections.abc import Iterable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx import GraphModule, Node
from torch.fx.graph import _PyTreeCodeGen
from torch.fx.node import Argument, Target
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import CompileError

OpLike = Any  # an OpOverloadPacket, OpOverload or a python callable
aten = torch.ops.aten


def _targets(ops: OpLike | Iterable[OpLike]) -> set:
    if not isinstance(ops, (list, tuple, set, frozenset)):
        ops = [ops]
    out = set(ops)
    for op in ops:
        if isinstance(op, torch._ops.OpOverloadPacket):
            out.update(getattr(op, o) for o in op.overloads())
    return out


def is_op(node: Node, ops: OpLike | Iterable[OpLike]) -> bool:
    """True if `node` calls one of `ops` (an op packet matches all its overloads)."""
    if node.op != "call_function":
        return False
    return node.target in _targets(ops)


def nodes_calling(gm: GraphModule, ops: OpLike | Iterable[OpLike]) -> list[Node]:
    targets = _targets(ops)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]


def count_op(gm: GraphModule, ops: OpLike | Iterable[OpLike]) -> int:
    return len(nodes_calling(gm, ops))


def canonicalize_graph(gm: GraphModule) -> GraphModule:
    """Drop dead code and unused attributes, check the graph and regenerate its code."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _fake_mode_of(gm: GraphModule) -> FakeTensorMode:
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, FakeTensor):
            return val.fake_mode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)


class InputDeviceFakeProp(FakeTensorProp):
    """Fake tensor propagation that sees every attribute tensor on the graph inputs' device.

    A model built on meta keeps computed buffers (rotary `inv_freq`, router score biases) real on the CPU;
    weight loading moves them next to the parameters, so that is where the graph meets them at run time.
    """

    def __init__(self, gm: GraphModule, mode: FakeTensorMode, device: torch.device | None = None):
        super().__init__(gm, mode=mode)
        if device is None:
            inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
            device = next((v.device for v in inputs if isinstance(v, torch.Tensor)), None)
        self._device = device

    def get_attr(self, target: Target, args: tuple[Argument, ...], kwargs: dict[str, Any]) -> Any:
        value = super().get_attr(target, args, kwargs)
        if self._device is None or not isinstance(value, torch.Tensor) or value.device == self._device:
            return value
        # A static-shaped stand-in (from_tensor could give a weight symbolic sizes); values do not matter here.
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=self._device)


def run_shape_prop(gm: GraphModule) -> GraphModule:
    """Refresh `meta['val']` of every node with fake tensors, keeping symbolic input shapes."""
    fake_mode = _fake_mode_of(gm)
    inputs = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [fake_mode.from_tensor(v) if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) else v
              for v in inputs]
    # Inputs added later (cache and metadata placeholders) carry meta-device values: all inputs meet on one device.
    device = next((v.device for v in inputs if isinstance(v, torch.Tensor)), None)
    fake_mode.allow_non_fake_inputs = True
    with fake_mode:
        inputs = [v.to(device) if isinstance(v, torch.Tensor) and v.device != device else v for v in inputs]
        InputDeviceFakeProp(gm, fake_mode, device).propagate_dont_convert_inputs(*inputs)
    return gm


def get_attr_tensor(gm: GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer that a get_attr node with `target` reads."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def placeholder_names(gm: GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


# ---- node helpers (every transform's matchers use these; one copy each) ---------------------------

OPEN_END = sys.maxsize  # what export writes for an open-ended slice `x[a:]`


def arg(node: Node, idx: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > idx:
        return node.args[idx]
    return node.kwargs.get(name, default)


def val(node: Any) -> Any:
    """The fake tensor export recorded for `node` (None if unknown)."""
    return node.meta.get("val") if isinstance(node, Node) else None


def static_shape(node: Any) -> tuple[int, ...] | None:
    """The shape of `node` with symbolic sizes as None; None when the node has no tensor meta."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(s if isinstance(s, int) else None for s in v.shape)


def set_fake_val(node: Node) -> None:
    """Fill `meta['val']` of a new node by running its target on the inputs' fake tensors."""
    fakes = [val(n) for n in node.all_input_nodes]
    if any(v is None for v in fakes):
        return
    mode = next((v.fake_mode for v in pytree.tree_leaves(fakes) if isinstance(v, FakeTensor)), None)
    if mode is None:
        return
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), val)
    try:
        with mode:
            node.meta["val"] = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - meta is a convenience; shape prop can refresh it later
        pass


def eliminate_dead_code(gm: GraphModule) -> None:
    """DCE that also drops `_assert_tensor_metadata` checks on tensors nothing else uses any more.

    Export leaves those asserts on every cast; as side-effecting nodes they would keep a replaced
    subgraph alive.
    """
    def is_assert(n: Node) -> bool:
        return is_op(n, aten._assert_tensor_metadata)

    changed = True
    while changed:
        gm.graph.eliminate_dead_code()
        changed = False
        for n in list(gm.graph.nodes):
            if is_assert(n) and isinstance(n.args[0], Node) and all(is_assert(u) for u in n.args[0].users):
                gm.graph.erase_node(n)
                changed = True


def operands(node: Node, op: Any) -> tuple[Node, Node] | None:
    """The two tensor operands of a binary `op` node (mul/add/sub), or None."""
    if not is_op(node, op) or len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args[0], node.args[1]
    return (a, b) if isinstance(a, Node) and isinstance(b, Node) else None


def slice_args(node: Node) -> tuple[Node, int, int, int, int] | None:
    """(input, dim, start, end, step) of an aten.slice node with int bounds; dim normalised."""
    if not is_op(node, aten.slice):
        return None
    x = node.args[0]
    shape = static_shape(x)
    if shape is None:
        return None
    dim, start = arg(node, 1, "dim", 0), arg(node, 2, "start", None)
    end, step = arg(node, 3, "end", None), arg(node, 4, "step", 1)
    start = 0 if start is None else start
    end = OPEN_END if end is None else end
    if not all(isinstance(v, int) for v in (dim, start, end, step)):
        return None
    return x, dim % len(shape), start, end, step


def is_last_dim(dim: Any, node: Node) -> bool:
    shape = static_shape(node)
    return shape is not None and isinstance(dim, int) and dim % len(shape) == len(shape) - 1


def strip_full_slices(node: Node) -> Node:
    """Walk up through `x[:, :]`-style slices that keep every element."""
    while (s := slice_args(node)) is not None:
        x, dim, start, end, step = s
        size = static_shape(x)[dim]
        if not (start == 0 and step == 1 and (end == OPEN_END or (size is not None and end >= size))):
            break
        node = x
    return node


def unsqueezed(node: Node) -> tuple[Node, int] | None:
    """(source, dim) for `source.unsqueeze(dim)` (full slices around it ignored), dim normalised."""
    node = strip_full_slices(node)
    if not is_op(node, aten.unsqueeze):
        return None
    src, dim = node.args[0], arg(node, 1, "dim")
    src = strip_full_slices(src)
    shape = static_shape(src)
    if shape is None or not isinstance(dim, int):
        return None
    return src, dim % (len(shape) + 1)


def fake(node: Any) -> torch.Tensor | None:
    """The fake tensor export recorded for `node` (None if unknown)."""
    v = val(node)
    return v if isinstance(v, torch.Tensor) else None


def node_tensor(gm: GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor a node gives: a get_attr's own parameter or buffer, else the fake tensor export recorded."""
    if isinstance(node, Node) and node.op == "get_attr":
        return get_attr_tensor(gm, node.target)
    return fake(node)


def defined_before(node: Any, anchor: Node, order: dict[Node, float]) -> bool:
    """Make sure `node` (an argument of what goes at `anchor`) is defined before `anchor`: a later get_attr is moved
    up (it reads no other node, so the graph stays in order; `order` records its new place for later calls); False
    for any other later node."""
    if not isinstance(node, Node) or order.get(node, -1) < order[anchor]:
        return True
    if node.op != "get_attr":
        return False
    anchor.prepend(node)
    order[node] = order[anchor] - 0.5
    return True


def same_size(a: Any, b: Any) -> bool:
    """Static equality of two sizes; symbolic sizes are equal only if they are the same expression."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def erase_dead(gm: GraphModule, node: Node) -> None:
    """Erase `node` and then every input left without users.

    Needed because dead-code elimination keeps random ops such as aten.dropout (impure), and with
    them the whole softmax chain they read.
    """
    stack = [node]
    while stack:
        n = stack.pop()
        if n.op != "call_function" or n.users:
            continue
        inputs = n.all_input_nodes
        gm.graph.erase_node(n)
        stack.extend(inputs)


# ---- graph inputs ----------------------------------------------------------------------------------


def add_graph_inputs(
    gm: GraphModule, names: list[str], vals: list[torch.Tensor] | None = None, recompile: bool = True
) -> list[Node]:
    """Append keyword placeholders `names` to gm and keep its pytree calling convention in sync.

    `vals` (meta tensors) become the placeholders' `meta["val"]`, so shape propagation keeps working.
    `recompile=False`: the caller recompiles once after all its edits (each recompile of a 30-layer graph
    costs ~0.1 s of code generation).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    existing = {n.target for n in placeholders}
    clash = [n for n in names if n in existing]
    if clash:
        raise CompileError(f"graph already has inputs named {clash}")
    new: list[Node] = []
    anchor = placeholders[-1]
    for i, name in enumerate(names):
        with gm.graph.inserting_after(anchor):
            anchor = gm.graph.placeholder(name)
        if vals is not None:
            anchor.meta["val"] = vals[i]
        new.append(anchor)
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen):
        # torch.export's module takes (args, kwargs) through a pytree spec; we call it with keywords only.
        all_names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        in_spec = pytree.tree_structure(((), dict.fromkeys(all_names, 0)))
        codegen.pytree_info = codegen.pytree_info._replace(orig_args=all_names, in_spec=in_spec)
        gm._in_spec = in_spec
    if recompile:
        gm.recompile()
    return new


def graph_inputs(gm: GraphModule, names: list[str], vals: list[torch.Tensor]) -> list[Node]:
    """Placeholders `names` of gm: the existing ones (another cached-op transform added them) and new ones."""
    existing = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    missing = [(n, v) for n, v in zip(names, vals) if n not in existing]
    if missing:
        added = add_graph_inputs(gm, [n for n, _ in missing], [v for _, v in missing])
        existing.update(zip([n for n, _ in missing], added))
    return [existing[n] for n in names]
