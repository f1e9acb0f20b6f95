"""insert_cached_causal_conv: swap each torch_causal_conv1d (Mamba2 conv) for the version with conv state per sequence.

Before:  y = torch_causal_conv1d(x, weight, bias)                                   # x [b, s, c], zeros before
After:   y = torch_cached_causal_conv1d(x, weight, bias, *state metadata, conv_state_i)
with conv_state_i a new graph input of [max_batch_size + 1, channels, kernel - 1] in x's dtype (the last inputs).
"""

import torch
import torch.nn as nn
from ad_compiler.models.factory import ModelFactory
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry
from torch.fx import Node

from ...kv_cache.interface import StateSpec
from ... import state as _state  # noqa: F401 - registers the cached state ops
from ..cached_state import swap_for_cached_state_op


def _spec(node: Node) -> StateSpec:
    x, weight = node.args[0], node.args[1]
    c, k = weight.meta["val"].shape
    return StateSpec((int(c), int(k) - 1), x.meta["val"].dtype)


@TransformRegistry.register("insert_cached_causal_conv")
class InsertCachedCausalConv(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        n = swap_for_cached_state_op(
            "insert_cached_causal_conv", mod, cm, torch.ops.auto_deploy.torch_causal_conv1d,
            torch.ops.auto_deploy.torch_cached_causal_conv1d.default, "conv_state", 3, _spec,
        )
        if not n:
            return mod, TransformInfo(skipped=True, reason="no torch_causal_conv1d in the graph")
        return mod, TransformInfo(num_matches=n)
