"""Feed un-repeated k/v (n_kv heads) to torch_attention, which handles GQA itself."""

import torch
from torch.fx import GraphModule

from ...models.factory import ModelFactory
from ...utils.graph_utils import nodes_calling
from ..attention_utils import attention_args, repeat_kv_source, with_attention_args
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


@TransformRegistry.register("match_grouped_attention")
class MatchGroupedAttention(BaseTransform):
    """Drop repeat_kv in front of bnsd torch_attention (GQA: n_heads % n_kv == 0 is handled inside the op).

    Before: kr = repeat_kv(k, r); vr = repeat_kv(v, r); o = torch_attention(q, kr, vr, ..., layout="bnsd")
    After:  o = torch_attention(q, k, v, ..., layout="bnsd")
    repeat_kv is either match_repeat_kv's `repeat_interleave(x, r, 1)` or the raw unsqueeze/expand/reshape.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        num_matches = 0
        for node in nodes_calling(gm, torch.ops.auto_deploy.torch_attention):
            a = attention_args(node)
            if a["layout"] != "bnsd":  # repeat_kv repeats dim 1, which is the head dim only in bnsd
                continue
            k_src, v_src = repeat_kv_source(a["key"]), repeat_kv_source(a["value"])
            if k_src is None or v_src is None or k_src[1] != v_src[1]:
                continue
            with_attention_args(node, key=k_src[0], value=v_src[0])
            num_matches += 1
        return gm, TransformInfo(num_matches=num_matches)
