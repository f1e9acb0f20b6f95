"""Replace HF repeat_kv (unsqueeze/expand/reshape of k or v) by one explicit `aten.repeat_interleave` marker."""

import torch
from torch.fx import GraphModule

from ...models.factory import ModelFactory
from ...utils.graph_utils import set_fake_val
from ..attention_utils import repeat_kv_source
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten


@TransformRegistry.register("match_repeat_kv")
class MatchRepeatKv(BaseTransform):
    """Canonicalise repeat_kv so later matchers (match_grouped_attention) see a single node.

    Before: u = unsqueeze(k, 2); e = expand(u, [b, n_kv, n_rep, s, d]); r = reshape(e, [b, n_kv*n_rep, s, d])
    After:  r = aten.repeat_interleave(k, n_rep, 1)        # same values: head h reads kv head h // n_rep
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        num_matches = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is aten.repeat_interleave.self_int:
                continue
            if node.target not in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
                continue
            found = repeat_kv_source(node)
            if found is None:
                continue
            src, n_rep = found
            with gm.graph.inserting_before(node):
                marker = gm.graph.call_function(aten.repeat_interleave.self_int, (src, n_rep, 1))
            marker.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
            set_fake_val(marker)
            node.replace_all_uses_with(marker)
            num_matches += 1
        return gm, TransformInfo(num_matches=num_matches)
