"""Match Hugging Face RMSNorm subgraphs (Llama, Qwen3 q/k-norm, Gemma's 1 + weight) into torch_rmsnorm."""

import torch
from torch.fx import GraphModule, Node

from ... import custom_ops  # noqa: F401 - registers torch.ops.auto_deploy.*
from ...models.factory import ModelFactory
from ...utils.graph_utils import arg, eliminate_dead_code, is_op, operands, set_fake_val, static_shape, val
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as)


def _dtype(node: Node) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _cast_src(node: Node) -> Node | None:
    """The input of a pure dtype cast (`x.to(dtype)` / `type_as`), else None."""
    if not is_op(node, _CASTS) or not isinstance(node.args[0], Node):
        return None
    if set(node.kwargs) - {"dtype", "layout", "device", "copy", "non_blocking", "memory_format"}:
        return None
    return node.args[0]


def _normed(n: Node) -> tuple[Node, float] | None:
    """(xf, eps) for `n = xf * rsqrt(mean(xf**2, -1, keepdim=True) + eps)` with xf in fp32."""
    prod = operands(n, aten.mul)
    if prod is None:
        return None
    for xf, r in (prod, prod[::-1]):
        if not is_op(r, aten.rsqrt) or _dtype(xf) != torch.float32:
            continue
        add = r.args[0]
        if not is_op(add, aten.add) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
            continue
        mean, eps = add.args if isinstance(add.args[0], Node) else add.args[::-1]
        if not isinstance(eps, (int, float)) or not is_op(mean, aten.mean.dim):
            continue
        dims, keep = arg(mean, 1, "dim"), arg(mean, 2, "keepdim", False)
        shape = static_shape(xf)
        if not keep or shape is None or list(dims or []) not in ([-1], [len(shape) - 1]):
            continue
        sq = mean.args[0]
        if not is_op(sq, aten.pow.Tensor_Scalar) or sq.args[0] is not xf or sq.args[1] != 2:
            continue
        return xf, float(eps)
    return None


def match_rmsnorm(mul: Node) -> tuple[Node, Node, float] | None:
    """(input, weight, eps) such that `torch_rmsnorm(input, weight, eps)` computes `mul` exactly.

    The op is `weight * norm(input.float()).to(input.dtype)`, so:
      Llama/Qwen: mul = w * norm(x.float()).to(x.dtype)  -> input = x
      Gemma:      mul = norm(x.float()) * (1 + w.float()) -> input = x.float() (the cast back stays after it)
    """
    prod = operands(mul, aten.mul)
    if prod is None:
        return None
    for a, w in (prod, prod[::-1]):
        inner = _cast_src(a)
        n = inner if inner is not None else a
        found = _normed(n)
        if found is None:
            continue
        xf, eps = found
        if inner is None:
            inp = xf
        else:
            # The cast back must restore the dtype of the tensor whose fp32 copy was normalised.
            src = _cast_src(xf)
            if src is not None and _dtype(src) == _dtype(a):
                inp = src
            elif _dtype(a) == torch.float32:
                inp = xf
            else:
                continue
        ws, xs = static_shape(w), static_shape(inp)
        if ws is None or xs is None or len(ws) != 1 or ws[0] != xs[-1] or ws[0] is None:
            continue
        return inp, w, eps
    return None


@TransformRegistry.register("match_rmsnorm_pattern")
class MatchRmsnormPattern(BaseTransform):
    """Replace RMSNorm subgraphs by torch_rmsnorm.

    Before:  xf = x.to(f32); n = xf * rsqrt(mean(xf**2, -1, keepdim) + eps); out = w * n.to(x.dtype)
    After:   out = torch_rmsnorm(x, w, eps)
    Gemma's `(n * (1 + w.float())).type_as(x)` becomes `torch_rmsnorm(xf, 1 + w.float(), eps).type_as(x)`:
    the product stays in fp32 before the cast exactly as in the model, and `w` stays a parameter.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        num = 0
        for node in list(gm.graph.nodes):
            found = match_rmsnorm(node)
            if found is None:
                continue
            inp, w, eps = found
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.auto_deploy.torch_rmsnorm.default, (inp, w, eps))
            set_fake_val(new)
            node.replace_all_uses_with(new)
            num += 1
        eliminate_dead_code(gm)
        return gm, TransformInfo(num_matches=num)
