"""gather_logits_before_lm_head: run the LM head only on each sequence's last token.

Before:  logits = linear(hidden, lm_head_weight)                       # [1, T, vocab]
After:   logits = linear(index_select(hidden, 1, last_token_idx), w)   # [1, B, vocab]
with `last_token_idx` (int64 [B], SequenceInfo) as a new graph input. Only those rows are sampled,
and the vocab projection of a long prefill is the largest matmul of a small model.
"""

import torch
from ad_compiler.transform.interface import TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import add_graph_inputs, is_op
from torch.fx import GraphModule, Node

from ...kv_cache.interface import CachedSequenceInterface
from ..graph_transform import GraphTransform

INPUT_NAME = "last_token_idx"

# Row-wise ops that may sit between the LM head and the output (casts, Gemma's logit soft-cap).
_ROWWISE = (
    torch.ops.aten.to.dtype,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.tanh.default,
    torch.ops.aten.mul.Tensor,
    torch.ops.aten.mul.Scalar,
    torch.ops.aten.div.Tensor,
    torch.ops.aten.div.Scalar,
)


def _rowwise_input(node: Node) -> Node | None:
    """The tensor input of a row-wise op whose other arguments are constants, else None."""
    if not is_op(node, _ROWWISE) or not node.args or not isinstance(node.args[0], Node):
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
        with gm.graph.inserting_before(lm_head):
            picked = gm.graph.call_function(torch.ops.aten.index_select.default, (hidden, dim, idx))
        lm_head.replace_input_with(hidden, picked)
        gm.recompile()
        return gm, TransformInfo(num_matches=1)
