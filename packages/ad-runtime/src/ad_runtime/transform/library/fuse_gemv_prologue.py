"""fuse_gemv_prologue: the small op that feeds a linear runs inside that linear's one-row GEMV (batch-1 decode).

Before:  normed, summed = triton_fused_add_rmsnorm(x, residual, w, eps);  y = triton_gemv_linear(normed, W, b)
After:   y, summed = triton_add_rmsnorm_gemv_linear(x, residual, w, eps, W, b)

Before:  gate, up = split_with_sizes(gate_up, [I, I], -1);  y = triton_gemv_linear(silu(gate) * up, W, b)
After:   y = triton_swiglu_gemv_linear(gate_up, offset of gate, offset of up, W, b)

At batch 1 a Llama layer ran two add+RMSNorm kernels and one SiLU-and-multiply kernel of a few microseconds each
beside its four GEMVs; the GEMV now computes its input row itself (the row sits in L2), so those kernels and their
launches are gone. Calls with more rows (prefill, mixed and larger decode steps) run the same unfused kernels
and cuBLAS as before. Runs after gemv_decode_linear, whose ops it rewrites.
"""

import operator
from typing import Any

import torch
import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.models.factory import ModelFactory
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import arg, eliminate_dead_code, fake, get_attr_tensor, is_op, operands, val
from torch.fx import GraphModule, Node

from ...kernels import ops  # noqa: F401 - defines the fused GEMV ops

aten = torch.ops.aten
GEMV = torch.ops.auto_deploy.triton_gemv_linear.default
ADD_RMSNORM = torch.ops.auto_deploy.triton_fused_add_rmsnorm.default
NORM_GEMV = torch.ops.auto_deploy.triton_add_rmsnorm_gemv_linear.default
SWIGLU_GEMV = torch.ops.auto_deploy.triton_swiglu_gemv_linear.default


def _tensor(gm: GraphModule, node: Any) -> torch.Tensor | None:
    """The tensor (parameter or fake value) a node stands for."""
    if isinstance(node, Node) and node.op == "get_attr":
        return get_attr_tensor(gm, node.target)
    return fake(node)


def _single_use_getitem(node: Any, index: int) -> Node | None:
    """The tuple node that `node` takes item `index` of, if `node` is such a getitem with one user."""
    ok = isinstance(node, Node) and node.target is operator.getitem and node.args[1] == index
    return node.args[0] if ok and len(node.users) == 1 else None


def _norm_source(gm: GraphModule, gemv: Node) -> Node | None:
    """The add_rmsnorm node whose normed output only this GEMV reads, all of one dtype."""
    norm = _single_use_getitem(arg(gemv, 0, "input"), 0)
    if norm is None or not is_op(norm, ADD_RMSNORM):
        return None
    x, residual, weight = (_tensor(gm, arg(norm, i, n)) for i, n in ((0, "x"), (1, "residual"), (2, "weight")))
    tensors = (x, residual, weight, _tensor(gm, arg(gemv, 1, "weight")))
    if any(t is None for t in tensors) or len({t.dtype for t in tensors}) != 1:
        return None  # mixed dtypes round differently than the kernel does
    return norm


def _split_part(node: Any) -> tuple[Node, int, int] | None:
    """(source, offset, size) of a slice of `source` along its last dim taken by split(_with_sizes) + getitem."""
    if not (isinstance(node, Node) and node.target is operator.getitem):
        return None
    split, index = node.args
    if not is_op(split, [aten.split_with_sizes.default, aten.split.Tensor]):
        return None
    src, sizes, dim = split.args[0], split.args[1], arg(split, 2, "dim", 0)
    shape = getattr(fake(src), "shape", None)
    if shape is None or not isinstance(dim, int) or dim % len(shape) != len(shape) - 1:
        return None
    if isinstance(sizes, int):  # split.Tensor: equal parts of `sizes` features, the last one shorter
        sizes = [min(sizes, shape[-1] - i) for i in range(0, shape[-1], sizes)]
    if not all(isinstance(s, int) for s in sizes):
        return None
    return src, sum(sizes[:index]), sizes[index]


def _swiglu_source(gm: GraphModule, gemv: Node) -> tuple[Node, int, int] | None:
    """(gate_up, gate offset, up offset) when this GEMV's only input is silu(gate) * up of one gate_up row."""
    mul = arg(gemv, 0, "input")
    pair = operands(mul, aten.mul.Tensor) if isinstance(mul, Node) and len(mul.users) == 1 else None
    weight = _tensor(gm, arg(gemv, 1, "weight"))
    if pair is None or weight is None:
        return None
    k = weight.shape[-1]
    for act, up in (pair, pair[::-1]):
        if not (is_op(act, aten.silu.default) and len(act.users) == 1):
            continue
        gate, other = _split_part(act.args[0]), _split_part(up)
        if gate and other and gate[0] is other[0] and gate[2] == other[2] == k:
            if getattr(fake(gate[0]), "dtype", None) == getattr(fake(mul), "dtype", None) == weight.dtype:
                return gate[0], gate[1], other[1]
    return None


def _define_before(node: Any, anchor: Node, user: Node) -> None:
    """Move a get_attr of `user` defined after `anchor` up to it (get_attrs read no other node). It can only sit
    between the two, so only those nodes are looked at (not the whole graph once per fusion)."""
    if not (isinstance(node, Node) and node.op == "get_attr"):
        return
    n = anchor.next
    while n is not user:
        if n is node:
            anchor.prepend(node)
            return
        n = n.next


def _fuse_norm(gm: GraphModule, gemv: Node, norm: Node) -> None:
    graph = gm.graph
    weight, bias = arg(gemv, 1, "weight"), arg(gemv, 2, "bias")
    for n in (weight, bias):
        _define_before(n, norm, gemv)
    with graph.inserting_before(norm):
        inputs = (arg(norm, 0, "x"), arg(norm, 1, "residual"), arg(norm, 2, "weight"), arg(norm, 3, "eps"))
        fused = graph.call_function(NORM_GEMV, (*inputs, weight, bias))
        y = graph.call_function(operator.getitem, (fused, 0))
        summed = graph.call_function(operator.getitem, (fused, 1))
    y.meta["val"] = val(gemv)
    sums = [u for u in norm.users if u.args[1] == 1]
    summed.meta["val"] = val(sums[0]) if sums else None
    fused.meta["val"] = (y.meta["val"], summed.meta["val"])
    gemv.replace_all_uses_with(y)
    for s in sums:
        s.replace_all_uses_with(summed)


def _fuse_swiglu(gm: GraphModule, gemv: Node, source: tuple[Node, int, int]) -> None:
    with gm.graph.inserting_before(gemv):
        fused = gm.graph.call_function(SWIGLU_GEMV, (*source, arg(gemv, 1, "weight"), arg(gemv, 2, "bias")))
    fused.meta.update(gemv.meta)
    gemv.replace_all_uses_with(fused)


@TransformRegistry.register("fuse_gemv_prologue")
class FuseGemvPrologue(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if not isinstance(mod, GraphModule):
            raise CompileError("fuse_gemv_prologue needs an exported GraphModule")
        gm, num = mod, 0
        for gemv in [n for n in gm.graph.nodes if n.op == "call_function" and n.target is GEMV]:
            norm = _norm_source(gm, gemv) if self.config.add_rmsnorm else None
            swiglu = _swiglu_source(gm, gemv) if self.config.swiglu and norm is None else None
            if norm is not None:
                _fuse_norm(gm, gemv, norm)
            elif swiglu is not None:
                _fuse_swiglu(gm, gemv, swiglu)
            else:
                continue
            gm.graph.erase_node(gemv)
            num += 1
        if num:
            eliminate_dead_code(gm)
            gm.recompile()
        return gm, TransformInfo(num_matches=num)
