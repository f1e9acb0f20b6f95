"""Make every RoPE op work in the expected layout (bsnd by default), moving the transposes around it."""

import operator

import torch
from torch.fx import GraphModule, Node

from ... import custom_ops  # noqa: F401 - registers torch.ops.auto_deploy.*
from ...models.factory import ModelFactory
from ...utils.graph_utils import arg, eliminate_dead_code, is_op, nodes_calling, set_fake_val, static_shape
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten
ad = torch.ops.auto_deploy
# unsqueeze_dim of cos/sin (or freqs) for q/k laid out as [b, s, n, d] or [b, n, s, d].
_DIM = {"bsnd": 2, "bnsd": 1}
_DEFAULT_DIM = {  # the ops' default when the argument is left out
    ad.torch_rope_with_explicit_cos_sin.default: 1,
    ad.torch_rope_with_qk_interleaving.default: 1,
    ad.torch_rope_with_complex_freqs.default: 2,
}


def _is_swap_12(node: Node) -> bool:
    """`x.transpose(1, 2)` of a 4-D tensor (either order, negative dims too)."""
    if not is_op(node, aten.transpose.int):
        return False
    dims = {d % 4 for d in node.args[1:3]}
    return dims == {1, 2} and len(static_shape(node.args[0]) or ()) == 4


def _swap_12(gm: GraphModule, x: Node) -> Node:
    """x.transpose(1, 2), reusing x's source when x is itself such a transpose."""
    if _is_swap_12(x):
        return x.args[0]
    t = gm.graph.call_function(aten.transpose.int, (x, 1, 2))
    set_fake_val(t)
    return t


@TransformRegistry.register("match_rope_layout")
class MatchRopeLayout(BaseTransform):
    """Relayout torch_rope_* ops whose unsqueeze_dim does not match `expected_layout`.

    Before (expected bsnd):  q = x.transpose(1, 2); r = rope(q, k, cos, sin, 1); y = r[0]              # bnsd
    After:                   r = rope(x, k.transpose(1, 2), cos, sin, 2); y = r[0].transpose(1, 2)
    Transposes that would cancel (an input already transposed, an output transposed back) are skipped,
    so the op reads and writes bsnd directly; eliminate_redundant_transposes cleans up the rest.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        want = _DIM[self.config.expected_layout]
        num = 0
        for node in nodes_calling(gm, list(_DEFAULT_DIM)):
            pos = 3 if is_op(node, ad.torch_rope_with_complex_freqs) else 4
            dim = arg(node, pos, "unsqueeze_dim", _DEFAULT_DIM[node.target])
            q, k = node.args[0], node.args[1]
            if dim == want or dim not in _DIM.values():
                continue
            if len(static_shape(q) or ()) != 4 or len(static_shape(k) or ()) != 4:
                continue
            with gm.graph.inserting_before(node):
                qt, kt = _swap_12(gm, q), _swap_12(gm, k)
                tables = node.args[2:pos]
                new = gm.graph.call_function(node.target, (qt, kt, *tables, want))
                set_fake_val(new)
            for user in list(node.users):
                if user.target is not operator.getitem:
                    raise AssertionError(f"rope output {node} used by {user} directly")  # ops return tuples
                with gm.graph.inserting_before(user):
                    item = gm.graph.call_function(operator.getitem, (new, user.args[1]))
                    set_fake_val(item)
                    back = gm.graph.call_function(aten.transpose.int, (item, 1, 2))
                    set_fake_val(back)
                user.replace_all_uses_with(back)
                # Consumers that transpose back get the op's output as it is.
                for t in [u for u in back.users if _is_swap_12(u)]:
                    t.replace_all_uses_with(item)
            num += 1
        eliminate_dead_code(gm)
        return gm, TransformInfo(num_matches=num)
