"""Rewrite aten.scaled_dot_product_attention into auto_deploy.torch_attention (bnsd), reading the mask's meaning."""

import torch
from torch.fx import GraphModule

from ...models.factory import ModelFactory
from ...utils.graph_utils import arg, nodes_calling
from ..attention_utils import classify_mask, insert_torch_attention
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten


@TransformRegistry.register("match_sdpa_to_torch_attention")
class MatchSdpaToTorchAttention(BaseTransform):
    """One torch_attention per sdpa call; scale, dropout and GQA carry over.

    Before: o = aten.scaled_dot_product_attention(q, k, v, mask, scale=s)     # mask: causal [& window] [& packed]
    After:  o = auto_deploy.torch_attention(q, k, v, None, 0.0, True, s, None, window, None, "bnsd")
    A mask that classify_mask cannot prove to be the (sliding-window) causal mask stays as attn_mask
    with is_causal=False; is_causal=True without a mask stays causal, its window taken from
    `meta["custom"]["sliding_window"]` (set by the hf_sdpa_attention export patch).
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        num_matches = 0
        for node in nodes_calling(gm, aten.scaled_dot_product_attention):
            q, k, v = node.args[:3]
            mask = arg(node, 3, "attn_mask")
            dropout_p = arg(node, 4, "dropout_p", 0.0)
            is_causal = arg(node, 5, "is_causal", False)
            scale = arg(node, 6, "scale")
            # The hf_sdpa_attention export patch drops the mask and records the layer's window here.
            window = node.meta.get("custom", {}).get("sliding_window") if mask is None else None
            if mask is not None and not is_causal:
                info = classify_mask(gm, mask)
                if info is not None:
                    mask, is_causal, window = None, info.is_causal, info.sliding_window
            attn = insert_torch_attention(
                gm, node, q, k, v, mask, dropout_p, is_causal, scale, sliding_window=window, layout="bnsd"
            )
            node.replace_all_uses_with(attn)
            gm.graph.erase_node(node)
            num_matches += 1
        return gm, TransformInfo(num_matches=num_matches)
