"""gather_logits_before_lm_head: run the LM head, and the token-wise ops before it, only on each sequence's last
token.

Before:  logits = linear(hidden, lm_head_weight)                       # [1, T, vocab]
After:   logits = linear(index_select(hidden, 1, last_token_idx), w)   # [1, B, vocab]
with `last_token_idx` (int64 [B], SequenceInfo) as a new graph input. Only those rows are sampled,
and the vocab projection of a long prefill is the largest matmul of a small model.

With `hoist` the gather moves further up, above every op that treats each token alone and feeds only the LM head:
the last layer's output projection, its residual adds and norms, its MLP and the final norm then run on B rows, not
T (the last layer's attention output and residual stream are gathered instead). Prefill of 32 layers saves ~1/36 of
its linear work; decode steps (T == B) compute the same rows as before.
"""

import functools
import operator

import torch
from ad_compiler.transform.interface import TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import (add_graph_inputs, arg, fake, is_last_dim, is_op, same_size,
                                           strip_full_slices)
from torch.fx import GraphModule, Node

from ...kv_cache.interface import CachedSequenceInterface
from ..graph_transform import GraphTransform

INPUT_NAME = "last_token_idx"
# Ops that are token-wise when they work along the feature (last) dim only.
_LAST_DIM_OPS = (torch.ops.aten.split_with_sizes.default, torch.ops.aten.split.Tensor, torch.ops.aten.mean.dim)


@functools.cache
def _tokenwise_ops() -> tuple:
    """Ops whose output row t depends only on input row t (weights and constants aside): the ones the gather moves
    above, and (with constant other arguments) the casts and soft-caps between the LM head and the output."""
    aten, ad = torch.ops.aten, torch.ops.auto_deploy
    ops = [aten.linear.default, aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default,
           aten.tanh.default, aten.neg.default, aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.add.Tensor,
           aten.add.Scalar, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
           aten.to.dtype, aten._to_copy.default]
    names = ("torch_rmsnorm", "torch_rmsnorm_fused", "torch_fused_add_rmsnorm", "triton_rmsnorm",
             "triton_fused_add_rmsnorm", "torch_dist_all_reduce", "torch_moe", "torch_moe_fused")
    return (*ops, *(getattr(ad, n).default for n in names if hasattr(ad, n)))


def _is_tokenwise(node: Node) -> bool:
    if node.target is operator.getitem:  # an output of a multi-output token-wise op (not indexing into a tensor)
        src = node.args[0]
        return isinstance(src.meta.get("val"), (tuple, list)) and is_op(src, _tokenwise_ops() + _LAST_DIM_OPS)
    if is_op(node, torch.ops.aten.slice):  # a slice that keeps everything (logits_to_keep=0 leaves two)
        return strip_full_slices(node) is not node
    if is_op(node, _LAST_DIM_OPS):  # splits and means along the feature dim only
        dim = arg(node, 1, "dim", None) if is_op(node, torch.ops.aten.mean) else arg(node, 2, "dim", 0)
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        return len(dims) == 1 and is_last_dim(dims[0], node.args[0])
    return is_op(node, _tokenwise_ops())


def _token_axis_only(v, ndim: int, dim: int, tokens) -> bool | None:
    """True: a tensor (or tuple of them) with the hidden states' token axis; False: no token-sized dim at all (a
    weight-like operand); None: tokens along another axis (not safe to gather)."""
    if isinstance(v, (tuple, list)):  # every item the same kind, or not to be told
        kinds = {_token_axis_only(x, ndim, dim, tokens) for x in v} or {False}
        return kinds.pop() if len(kinds) == 1 else None
    if not isinstance(v, torch.Tensor):
        return False
    if v.dim() == ndim and same_size(v.shape[dim], tokens):
        return True
    return None if any(same_size(s, tokens) for s in v.shape) else False


def token_tail(gm: GraphModule, lm_head: Node, dim: int) -> tuple[set[Node], list[Node]] | None:
    """The token-wise ops whose only readers are the LM head or each other (the LM head included), and the values
    they read from outside (the tensors to gather). None if some value's token axis cannot be told."""
    hidden = fake(lm_head.args[0])
    if hidden is None:
        return None
    tokens, ndim = hidden.shape[dim], hidden.dim()
    region = {lm_head}
    nodes = list(gm.graph.nodes)
    for node in reversed(nodes[: nodes.index(lm_head)]):
        if (node.op == "call_function" and node.users and all(u in region for u in node.users)
                and _is_tokenwise(node) and _token_axis_only(node.meta.get("val"), ndim, dim, tokens)):
            region.add(node)
    # A tuple item whose producer stays outside is where the region starts: gather that item.
    region = {n for n in region if n.target is not operator.getitem or n.args[0] in region}
    frontier: list[Node] = []
    for node in region:
        for a in node.all_input_nodes:
            if a in region or a.op == "get_attr" or a in frontier:
                continue
            kind = _token_axis_only(a.meta.get("val"), ndim, dim, tokens)
            if kind is None:
                return None
            if kind:
                frontier.append(a)
    return region, frontier


def _rowwise_input(node: Node) -> Node | None:
    """The tensor input of a row-wise op whose other arguments are constants, else None."""
    if not is_op(node, _tokenwise_ops()) or not node.args or not isinstance(node.args[0], Node):
        return None
    if any(isinstance(a, Node) for a in (*node.args[1:], *node.kwargs.values())):
        return None
    return node.args[0]


def _gathered_output(node: Node) -> Node | None:
    """The input of a vocab all-gather of tensor-parallel LM heads (concatenates along the last dim)."""
    gather = getattr(torch.ops.auto_deploy, "torch_dist_all_gather", None)
    if gather is None or not is_op(node, gather) or not isinstance(node.args[0], Node):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    val = node.meta.get("val")
    return node.args[0] if dim == -1 or (val is not None and dim == val.dim() - 1) else None


def find_lm_head(gm: GraphModule) -> Node | None:
    """The linear that produces the graph's only output, through row-wise ops; None if there is none."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    res = out.args[0]
    while isinstance(res, (tuple, list)) and len(res) == 1:
        res = res[0]
    node = res if isinstance(res, Node) else None
    while node is not None and not is_op(node, torch.ops.aten.linear.default):
        if len(node.users) > 1:
            return None  # someone else reads the full-length tensor
        node = _rowwise_input(node) or _gathered_output(node)
    if node is None or len(node.users) > 1 or not isinstance(node.args[0], Node):
        return None
    return node


@TransformRegistry.register("gather_logits_before_lm_head")
class GatherLogitsBeforeLmHead(GraphTransform):
    def _rewrite(self, gm: GraphModule, cm: CachedSequenceInterface) -> tuple[GraphModule, TransformInfo]:
        if INPUT_NAME in {n.target for n in gm.graph.nodes if n.op == "placeholder"}:
            return gm, TransformInfo(skipped=True, reason="the graph already gathers the last tokens")
        lm_head = find_lm_head(gm)
        if lm_head is None:
            return gm, TransformInfo(skipped=True, reason="no linear LM head feeds the output")
        hidden = lm_head.args[0]
        val = hidden.meta.get("val")
        dim = val.dim() - 2 if val is not None else 1  # the token axis: [1, T, H] or [T, H]
        # A real one-sequence example on the cache device: shape propagation mixes it with the hidden states.
        example = cm.info.padded_decode_args(1)[INPUT_NAME].clone()
        (idx,) = add_graph_inputs(gm, [INPUT_NAME], [example])
        cm.add_metadata(INPUT_NAME)
        tail = token_tail(gm, lm_head, dim) if self.config.hoist else None
        region, frontier = tail if tail is not None else ({lm_head}, [hidden])
        for value in frontier:
            with gm.graph.inserting_after(idx if value.op == "placeholder" else value):
                picked = gm.graph.call_function(torch.ops.aten.index_select.default, (value, dim, idx))
            picked.meta = dict(value.meta)  # stale row count, like every node of the region: shape prop refreshes
            for reader in [u for u in value.users if u in region]:
                reader.replace_input_with(value, picked)
        gm.recompile()
        return gm, TransformInfo(num_matches=1)
