"""Fuse linears that read the same input (q/k/v, gate/up) into one GEMM on concatenated weights.

Before: q = linear(x, Wq); k = linear(x, Wk); v = linear(x, Wv)
After:  qkv = linear(x, W_fused = cat([Wq, Wk, Wv])); q, k, v = split_with_sizes(qkv, [nq, nk, nv], -1)
The fused weight is a new parameter next to the originals, which are removed (this runs after loading).
"""

import operator

import torch
from torch.fx import GraphModule, Node

from ...models.factory import ModelFactory
from ...utils.graph_utils import arg, get_attr_tensor, nodes_calling
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten


def _owner(gm: GraphModule, target: str) -> tuple[torch.nn.Module, str]:
    path, _, name = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), name


def _fusable_key(gm: GraphModule, lin: Node) -> tuple | None:
    """Linears fuse only with others of the same input, weight dtype/device/in-features and bias presence."""
    weight = lin.args[1]
    bias = arg(lin, 2, "bias")
    if not (isinstance(weight, Node) and weight.op == "get_attr"):
        return None
    if bias is not None and not (isinstance(bias, Node) and bias.op == "get_attr"):
        return None
    w = get_attr_tensor(gm, weight.target)
    if w.dim() != 2:
        return None
    return (lin.args[0], w.dtype, w.device, w.shape[1], bias is not None)


def _fused_name(targets: list[str]) -> tuple[str, str]:
    """(owner path, attribute) for the fused tensor: `<common prefix>.fused_<a>_<b>_<leaf>`."""
    split = [t.split(".") for t in targets]
    common: list[str] = []
    for parts in zip(*(s[:-1] for s in split)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    leaf = split[0][-1]
    middle = ["_".join(s[len(common) : -1]) or "w" for s in split]
    return ".".join(common), f"fused_{'_'.join(middle)}_{leaf}"


def _concat_param(gm: GraphModule, attrs: list[Node], before: Node) -> Node:
    """Register cat(attr tensors, dim 0) as a new parameter and return a get_attr node for it."""
    owner_path, name = _fused_name([a.target for a in attrs])
    owner = gm.get_submodule(owner_path) if owner_path else gm
    while hasattr(owner, name):
        name += "_"
    fused = torch.cat([get_attr_tensor(gm, a.target).detach() for a in attrs], dim=0)
    owner.register_parameter(name, torch.nn.Parameter(fused, requires_grad=False))
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(f"{owner_path}.{name}" if owner_path else name)


def _fuse(gm: GraphModule, linears: list[Node]) -> None:
    graph = gm.graph
    first = linears[0]  # earliest in graph order: x and every weight exist before it
    weights = [lin.args[1] for lin in linears]
    sizes = [get_attr_tensor(gm, w.target).shape[0] for w in weights]
    w_node = _concat_param(gm, weights, first)
    biases = [arg(lin, 2, "bias") for lin in linears]
    b_node = _concat_param(gm, biases, first) if biases[0] is not None else None
    with graph.inserting_before(first):
        fused = graph.call_function(aten.linear.default, (first.args[0], w_node, b_node))
        split = graph.call_function(aten.split_with_sizes.default, (fused, sizes, -1))
        parts = [graph.call_function(operator.getitem, (split, i)) for i in range(len(linears))]
    fused.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
    vals = [lin.meta.get("val") for lin in linears]
    if all(isinstance(v, torch.Tensor) for v in vals):
        # Shapes for the new nodes from the ones they replace, so later transforms need no shape propagation.
        fused.meta["val"], split.meta["val"] = torch.cat(vals, dim=-1), list(vals)
        for part, val in zip(parts, vals):
            part.meta["val"] = val
    for lin, part in zip(linears, parts):
        lin.replace_all_uses_with(part)
        graph.erase_node(lin)
    old = [a for a in dict.fromkeys(weights + biases) if a is not None and not a.users]
    _drop_unused_attrs(gm, old)


def _drop_unused_attrs(gm: GraphModule, attrs: list[Node]) -> None:
    for attr in attrs:
        target = attr.target
        gm.graph.erase_node(attr)
        if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
            continue
        owner, name = _owner(gm, target)
        if name in owner._parameters or name in owner._buffers:
            delattr(owner, name)


@TransformRegistry.register("fuse_gemms")
class FuseGemms(BaseTransform):
    """Group aten.linear nodes by input; fuse each group of two or more."""

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        groups: dict[tuple, list[Node]] = {}
        for lin in nodes_calling(gm, aten.linear):
            key = _fusable_key(gm, lin)
            if key is not None:
                groups.setdefault(key, []).append(lin)
        num = 0
        for linears in groups.values():
            # The same weight twice (tied) would be copied twice: not worth fusing.
            if len(linears) < 2 or len({lin.args[1].target for lin in linears}) != len(linears):
                continue
            _fuse(gm, linears)
            num += 1
        gm.recompile()
        return gm, TransformInfo(num_matches=num)
