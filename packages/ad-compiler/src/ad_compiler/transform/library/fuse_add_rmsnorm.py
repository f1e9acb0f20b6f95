"""Fuse each residual add with the RMSNorm that reads it into the backend's "add_rmsnorm" kernel (two outputs)."""

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import Graph, GraphModule, Node

from ... import custom_ops  # noqa: F401 - registers torch.ops.auto_deploy.*
from ...kernels_registry import available_backends, get_kernel
from ...models.factory import ModelFactory
from ...utils.graph_utils import arg, defined_before, fake, is_op, nodes_calling, same_size, set_fake_val, val
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten


def _norm_ops() -> list[Any]:
    """The canonical norm and every registered "rmsnorm" backend (fuse_rmsnorm may have run before us)."""
    return [torch.ops.auto_deploy.torch_rmsnorm, *(get_kernel("rmsnorm", b) for b in available_backends("rmsnorm"))]


def _residual_add(norm: Node) -> Node | None:
    """The add that `norm` normalises, if it is a plain `a + b` of two tensors of one shape and dtype."""
    add = arg(norm, 0, "input")
    # An alpha (a + alpha * b) or a scalar operand is another computation than the kernel's x + residual.
    if not isinstance(add, Node) or not is_op(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs:
        return None
    a, b = (fake(n) for n in add.args)
    if a is None or b is None or a.dtype != b.dtype or a.dim() != b.dim():
        return None  # broadcasting or promoting adds stay: the kernel reads two equal rows
    return add if all(same_size(s, t) for s, t in zip(a.shape, b.shape)) else None


def _matches(gm: GraphModule) -> list[tuple[Node, Node]]:
    """(norm, add) pairs, one norm per add (a second norm of the same sum then reads the fused sum)."""
    pairs, seen = [], set()
    for norm in nodes_calling(gm, _norm_ops()):
        add = _residual_add(norm)
        if add is not None and add not in seen:
            seen.add(add)
            pairs.append((norm, add))
    return pairs


def _fuse(graph: Graph, norm: Node, add: Node, kernel: Callable, order: dict[Node, float]) -> bool:
    """Replace the pair by kernel(x, residual, weight, eps) and its two getitems; False if left as it was."""
    weight, eps = arg(norm, 1, "weight"), arg(norm, 2, "eps")
    if not defined_before(weight, add, order):  # the fused node goes at the add
        return False
    x, residual = add.args
    # Right after the add: every user of the sum, also one placed before the norm, then sees its getitem defined.
    with graph.inserting_after(add):
        fused = graph.call_function(kernel, (x, residual, weight, eps))
    with graph.inserting_after(fused):
        summed = graph.call_function(operator.getitem, (fused, 1))
    with graph.inserting_after(fused):
        normed = graph.call_function(operator.getitem, (fused, 0))
    fused.meta.update(norm.meta)
    if val(norm) is not None and val(add) is not None:
        fused.meta["val"] = (val(norm), val(add))
    else:
        set_fake_val(fused)
    if isinstance(fused.meta.get("val"), tuple):
        normed.meta["val"], summed.meta["val"] = fused.meta["val"]
    norm.replace_all_uses_with(normed)
    graph.erase_node(norm)
    add.replace_all_uses_with(summed)
    graph.erase_node(add)
    return True


@TransformRegistry.register("fuse_add_rmsnorm")
class FuseAddRmsnorm(BaseTransform):
    """Fuse a residual add and the RMSNorm reading it into one kernel that returns the norm and the sum.

    Before:  h = aten.add.Tensor(x, residual)             # h is also the next layer's residual
             n = torch_rmsnorm_fused(h, w, eps)           # or torch_rmsnorm, triton_rmsnorm
    After:   f = torch_fused_add_rmsnorm(x, residual, w, eps)   # backend torch (and "auto" without a GPU)
             f = triton_fused_add_rmsnorm(x, residual, w, eps)  # backend triton, registered by ad_runtime
             n = f[0]; h = f[1]
    The sum keeps the add's dtype and the norm is the backend's rmsnorm of it, so outputs equal the unfused
    graph's. Adds with an alpha, a scalar, or broadcasting or promoting operands, and norms of anything but an
    add, stay as they are.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        pairs = _matches(gm)
        if not pairs:
            return gm, TransformInfo(num_matches=0)
        # Looked up only when there is work, so a graph without such pairs never needs the backend installed.
        kernel = get_kernel("add_rmsnorm", self.config.backend)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        num = sum(_fuse(gm.graph, norm, add, kernel, order) for norm, add in pairs)
        if num:
            gm.recompile()
        return gm, TransformInfo(num_matches=num)
