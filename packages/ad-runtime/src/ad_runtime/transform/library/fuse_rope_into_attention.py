"""fuse_rope_into_attention: the triton cached-attention op rotates q and k itself, in its K/V-cache write.

Before:  r = triton_rope_with_cos_sin_cache(q, k, position_ids, cos_sin_cache, 2)
         out = triton_cached_attention(r[0], r[1], v, *metadata, k_cache, v_cache, sinks, scale, window, cap)
After:   out = triton_cached_attention(q, k, v, *metadata, k_cache, v_cache, sinks, scale, window, cap,
                                       cos_sin_cache, position_ids)

One kernel a layer then rotates the queries, rotates the keys straight into the cache and stores the values
(the rope kernel and the K/V write were two launches a layer, each far shorter than its launch at batch 1).
Only rotations whose outputs feed nothing but that attention call are fused; the answers are the same bits.
"""

import operator

import torch
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import nodes_calling, set_fake_val
from torch.fx import GraphModule, Node

from ...attention import triton_backend  # noqa: F401 - defines auto_deploy::triton_cached_attention
from ...kernels import ops  # noqa: F401 - defines auto_deploy::triton_rope_with_cos_sin_cache
from ..graph_transform import GraphTransform

ATTENTION = torch.ops.auto_deploy.triton_cached_attention.default
ROPE = torch.ops.auto_deploy.triton_rope_with_cos_sin_cache.default
# The op's arguments without its two trailing RoPE ones (the table and the positions): a call of this length is
# not fused yet.
UNFUSED_ARGS = len(ATTENTION._schema.arguments) - 2


def _rotation_of(q: object, k: object) -> Node | None:
    """The bsnd rope call whose outputs 0 and 1 are q and k and are used once each (else None)."""
    if not all(isinstance(x, Node) and x.target is operator.getitem for x in (q, k)):
        return None
    rope, iq = q.args
    if k.args != (rope, 1) or iq != 0 or not isinstance(rope, Node) or rope.target is not ROPE:
        return None
    dim = rope.args[4] if len(rope.args) > 4 else rope.kwargs.get("unsqueeze_dim", 2)
    if dim != 2 or len(q.users) != 1 or len(k.users) != 1 or len(rope.users) != 2:
        return None
    return rope


@TransformRegistry.register("fuse_rope_into_attention")
class FuseRopeIntoAttention(GraphTransform):
    needs_cm = False

    def _rewrite(self, gm: GraphModule, cm: CacheInterface | None) -> tuple[GraphModule, TransformInfo]:
        attentions = nodes_calling(gm, ATTENTION)
        if not attentions:
            return gm, TransformInfo(skipped=True, reason="no triton_cached_attention (another attention backend)")
        num = 0
        for node in attentions:
            if len(node.args) != UNFUSED_ARGS or node.kwargs:
                continue  # already fused, or called in a form this transform does not know
            rope = _rotation_of(node.args[0], node.args[1])
            if rope is None:
                continue
            q, k, pos, cos_sin = rope.args[:4]
            old_q, old_k = node.args[0], node.args[1]
            node.args = (q, k, *node.args[2:], cos_sin, pos)
            set_fake_val(node)  # the output dtype is the rotation's: result_type(q, cos_sin)
            for x in (old_q, old_k, rope):
                gm.graph.erase_node(x)
            num += 1
        if num:
            gm.recompile()
        return gm, TransformInfo(num_matches=num)
