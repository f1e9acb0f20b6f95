"""fuse_gemv_swiglu: the merged gate/up GEMV writes silu(gate) * up itself, so no activation kernel follows it.

Before:  gu = triton_gemv_linear(x, W_gate_up, b)
         gate, up = split_with_sizes(gu, [n, n], -1)      (or split(gu, n, -1), or chunk(gu, 2, -1))
         h = mul(silu(gate), up)
After:   h = triton_gemv_swiglu(x, W_gate_up, b)

At batch 1 the activation was a launch of its own after every MLP's GEMV, one that waited for the GEMV to finish
(Inductor's kernels do not take part in programmatic dependent launch); the fused GEMV computes it in the program
that produced the matching gate and up features. More rows run cuBLAS and one activation pass, as before.
Runs after gemv_decode_linear and fuse_gemms (which merges gate and up, gate first); other activations stay.
"""

import operator

import torch
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import erase_dead, is_last_dim, is_op, nodes_calling, static_shape
from torch.fx import GraphModule, Node

from ...kernels import ops  # noqa: F401 - defines auto_deploy::triton_gemv_linear and triton_gemv_swiglu
from ..graph_transform import GraphTransform

GEMV = torch.ops.auto_deploy.triton_gemv_linear.default
GEMV_SWIGLU = torch.ops.auto_deploy.triton_gemv_swiglu.default
SPLIT = torch.ops.aten.split_with_sizes.default
SPLIT_EVEN = torch.ops.aten.split.Tensor  # split(x, size, dim): pieces of `size`
CHUNK = torch.ops.aten.chunk.default  # chunk(x, 2, dim): what a model that merges gate/up itself (Phi-3) exports
SILU = torch.ops.aten.silu.default
MUL = torch.ops.aten.mul.Tensor


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _splits_in_halves(split: Node, gemv: Node) -> bool:
    """Whether `split` cuts the GEMV's output in two equal halves along its last dimension."""
    shape = static_shape(gemv)
    if shape is None or shape[-1] is None or shape[-1] % 2:
        return False
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if is_op(split, SPLIT):
        halves = list(split.args[1]) == [shape[-1] // 2] * 2
    elif is_op(split, SPLIT_EVEN):
        halves = split.args[1] == shape[-1] // 2
    elif is_op(split, CHUNK):
        halves = split.args[1] == 2
    else:
        return False
    return halves and is_last_dim(dim, gemv)


def _halves(gemv: Node) -> tuple[Node, Node] | None:
    """(gate, up): the two getitems of the GEMV's only user, an even split of its last dimension."""
    split = _only_user(gemv)
    if split is None or len(split.users) != 2 or not _splits_in_halves(split, gemv):
        return None
    parts = {u.args[1]: u for u in split.users if u.target is operator.getitem}
    return (parts[0], parts[1]) if set(parts) == {0, 1} else None


def _swiglu_of(gemv: Node) -> Node | None:
    """The mul(silu(gate), up) node that is the only use of the GEMV's two halves, else None."""
    halves = _halves(gemv)
    if halves is None:
        return None
    gate, up = halves
    silu, mul = _only_user(gate), _only_user(up)
    if silu is None or not is_op(silu, SILU) or mul is None or not is_op(mul, MUL) or _only_user(silu) is not mul:
        return None
    return mul if set(mul.args) == {silu, up} and not mul.kwargs else None


@TransformRegistry.register("fuse_gemv_swiglu")
class FuseGemvSwiglu(GraphTransform):
    needs_cm = False

    def _rewrite(self, gm: GraphModule, cm: CacheInterface | None) -> tuple[GraphModule, TransformInfo]:
        gemvs = nodes_calling(gm, GEMV)
        if not gemvs:
            return gm, TransformInfo(skipped=True, reason="no triton_gemv_linear (gemv_decode_linear did not run)")
        num = 0
        for gemv in gemvs:
            mul = _swiglu_of(gemv)
            if mul is None:
                continue
            with gm.graph.inserting_before(mul):
                fused = gm.graph.call_function(GEMV_SWIGLU, tuple(gemv.args), dict(gemv.kwargs))
            fused.meta.update(mul.meta)  # same shape and dtype as the product it replaces
            mul.replace_all_uses_with(fused)
            erase_dead(gm, mul)  # and with it the silu, the halves, their split and the GEMV
            num += 1
        if num:
            gm.recompile()
        return gm, TransformInfo(num_matches=num)
