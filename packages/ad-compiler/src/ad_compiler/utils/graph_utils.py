"""FX graph helpers used by every transform: op checks, clean-up and shape propagation."""

from collections.abc import Iterable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import GraphModule, Node
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

OpLike = Any  # an OpOverloadPacket, OpOverload or a python callable


def _targets(ops: OpLike | Iterable[OpLike]) -> set:
    if not isinstance(ops, (list, tuple, set, frozenset)):
        ops = [ops]
    out = set()
    for op in ops:
        out.add(op)
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
        if isinstance(val, torch._subclasses.fake_tensor.FakeTensor):
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

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if self._device is None or not isinstance(value, torch.Tensor) or value.device == self._device:
            return value
        # A static-shaped stand-in (from_tensor could give a weight symbolic sizes); values do not matter here.
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=self._device)


def run_shape_prop(gm: GraphModule) -> GraphModule:
    """Refresh `meta['val']` of every node with fake tensors, keeping symbolic input shapes."""
    fake_mode = _fake_mode_of(gm)
    inputs = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            inputs.append(val if isinstance(val, torch._subclasses.fake_tensor.FakeTensor) else fake_mode.from_tensor(val))
        else:
            inputs.append(val)
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
