"""fuse_add_rmsnorm_gemv: a residual add + RMSNorm whose norm only feeds a GEMV op becomes part of that GEMV.

Before:  f = triton_fused_add_rmsnorm(x, residual, w_norm, eps)
         y = triton_gemv_linear(f[0], W, b)          (or triton_gemv_swiglu)
         h = f[1]                                    # the next residual
After:   g = triton_add_rmsnorm_gemv(x, residual, w_norm, eps, W, b, swiglu)
         y = g[0]; h = g[1]

At batch 1 the norm was a launch of its own before each attention and MLP block (two a layer): every program of
the GEMV now sums the one row, takes its RMS and normalises the slices it multiplies (program 0 stores the sum),
rounding where the two kernels rounded. More rows run the add_rmsnorm kernel and the linear as before.
Runs after gemv_decode_linear and fuse_gemv_swiglu; a norm read by anything else than one GEMV stays.
"""

import operator

import torch
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import defined_before, is_op, node_tensor, nodes_calling
from torch.fx import GraphModule, Node

from ...kernels import ops  # noqa: F401 - defines the triton_* ops read and written here
from ..graph_transform import GraphTransform

ADD_RMSNORM = torch.ops.auto_deploy.triton_fused_add_rmsnorm.default
GEMV = torch.ops.auto_deploy.triton_gemv_linear.default
GEMV_SWIGLU = torch.ops.auto_deploy.triton_gemv_swiglu.default
FUSED = torch.ops.auto_deploy.triton_add_rmsnorm_gemv.default


def _items(norm: Node) -> dict[int, Node] | None:
    """The getitems of the add_rmsnorm node by index, None if anything else reads its tuple."""
    items = {u.args[1]: u for u in norm.users if u.target is operator.getitem}
    return items if len(items) == len(norm.users) else None


def _gemv_reading(normed: Node) -> Node | None:
    """The GEMV op that is the normed output's only user, reading it as its input; else None."""
    if len(normed.users) != 1:
        return None
    gemv = next(iter(normed.users))
    if not is_op(gemv, (GEMV, GEMV_SWIGLU)) or gemv.args[0] is not normed or normed in gemv.args[1:]:
        return None
    return gemv


def _same_dtypes(gm: GraphModule, norm: Node, gemv: Node) -> bool:
    """x and residual of one dtype and the norm's output in the linear weight's dtype (the fused kernel's rounding)."""
    x, residual, normed, weight = (node_tensor(gm, n) for n in (norm.args[0], norm.args[1], gemv.args[0], gemv.args[1]))
    if any(t is None for t in (x, residual, normed, weight)):
        return False
    return x.dtype == residual.dtype and normed.dtype == weight.dtype


def _fuse(gm: GraphModule, norm: Node, order: dict[Node, float]) -> bool:
    items = _items(norm)
    if items is None or 0 not in items:
        return False
    gemv = _gemv_reading(items[0])
    if gemv is None or len(gemv.args) < 2 or not _same_dtypes(gm, norm, gemv):
        return False
    weight, bias = gemv.args[1], gemv.args[2] if len(gemv.args) > 2 else None
    if not all(defined_before(n, norm, order) for n in (weight, bias)):
        return False
    # At the norm's place: a reader of the sum placed between the norm and the GEMV then sees it defined.
    x, residual, norm_weight, eps = norm.args
    with gm.graph.inserting_after(norm):
        fused = gm.graph.call_function(FUSED, (x, residual, norm_weight, eps, weight, bias, is_op(gemv, GEMV_SWIGLU)))
    with gm.graph.inserting_after(fused):
        summed = gm.graph.call_function(operator.getitem, (fused, 1))
        y = gm.graph.call_function(operator.getitem, (fused, 0))
    y.meta.update(gemv.meta)
    if 1 in items:
        summed.meta.update(items[1].meta)
        items[1].replace_all_uses_with(summed)
    if "val" in y.meta and "val" in summed.meta:
        fused.meta["val"] = (y.meta["val"], summed.meta["val"])
    gemv.replace_all_uses_with(y)
    for dead in (gemv, items[0], items.get(1), norm):
        if dead is not None:
            gm.graph.erase_node(dead)
    if not summed.users:
        gm.graph.erase_node(summed)
    return True


@TransformRegistry.register("fuse_add_rmsnorm_gemv")
class FuseAddRmsnormGemv(GraphTransform):
    needs_cm = False

    def _rewrite(self, gm: GraphModule, cm: CacheInterface | None) -> tuple[GraphModule, TransformInfo]:
        if not nodes_calling(gm, (GEMV, GEMV_SWIGLU)):
            return gm, TransformInfo(skipped=True, reason="no triton_gemv_linear (gemv_decode_linear did not run)")
        norms = nodes_calling(gm, ADD_RMSNORM)
        if not norms:
            return gm, TransformInfo(skipped=True, reason="no triton_fused_add_rmsnorm (fuse_add_rmsnorm's backend "
                                                          "is not triton)")
        order: dict[Node, float] = {n: i for i, n in enumerate(gm.graph.nodes)}
        num = sum(_fuse(gm, norm, order) for norm in norms)
        if num:
            gm.recompile()
        return gm, TransformInfo(num_matches=num)
