"""insert_cached_causal_conv: swap each torch_causal_conv1d (Mamba2 conv) for the version with conv state per sequence.

Before:  y = torch_causal_conv1d(x, weight, bias)                                   # x [b, s, c], zeros before
After:   y = torch_cached_causal_conv1d(x, weight, bias, *state metadata, conv_state_i)
with conv_state_i a new graph input of [max_batch_size + 1, channels, kernel - 1] in x's dtype (the last inputs).
"""

import torch
from ad_compiler.transform.interface import TransformRegistry
from torch.fx import Node

from ...kv_cache.interface import StateSpec
from ..cached_state import CachedStateTransform


@TransformRegistry.register("insert_cached_causal_conv")
class InsertCachedCausalConv(CachedStateTransform):
    op, cached_op = "torch_causal_conv1d", "torch_cached_causal_conv1d"
    state_name, num_tensors = "conv_state", 3

    @staticmethod
    def state_spec(node: Node) -> StateSpec:
        x, weight = node.args[0], node.args[1]
        c, k = weight.meta["val"].shape
        return StateSpec((int(c), int(k) - 1), x.meta["val"].dtype)
