"""Give every torch_attention the configured layout (bsnd by default) by transposing around it."""

import torch
from torch.fx import GraphModule

from ...models.factory import ModelFactory
from ...utils.graph_utils import nodes_calling, set_fake_val
from ..attention_utils import attention_args, insert_torch_attention
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten


@TransformRegistry.register("match_attention_layout")
class MatchAttentionLayout(BaseTransform):
    """Switch torch_attention between bnsd and bsnd; both swap dims 1 and 2, so one transpose each way.

    Before: o = torch_attention(q, k, v, ..., layout="bnsd")
    After:  o = transpose(torch_attention(transpose(q, 1, 2), transpose(k, 1, 2), transpose(v, 1, 2),
                                          ..., layout="bsnd"), 1, 2)
    The transposes usually cancel with the model's own (eliminate_redundant_transposes removes them).
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        target = self.config.attn_layout
        num_matches = 0
        for node in nodes_calling(gm, torch.ops.auto_deploy.torch_attention):
            a = attention_args(node)
            if a["layout"] == target:
                continue
            swapped = []
            for name in ("query", "key", "value"):
                with gm.graph.inserting_before(node):
                    t = gm.graph.call_function(aten.transpose.int, (a[name], 1, 2))
                set_fake_val(t)
                swapped.append(t)
            # attn_mask is [b, n, s_q, s_k] in both layouts, so it is passed through unchanged.
            new = insert_torch_attention(
                gm, node, *swapped, a["attn_mask"], a["dropout_p"], a["is_causal"], a["scale"], a["sinks"],
                a["sliding_window"], a["logit_cap"], layout=target,
            )  # fmt: skip
            with gm.graph.inserting_before(node):
                out = gm.graph.call_function(aten.transpose.int, (new, 1, 2))
            set_fake_val(out)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            num_matches += 1
        return gm, TransformInfo(num_matches=num_matches)
