"""insert_cached_linear_attention: swap each torch_linear_attention for the version with per-sequence state.

Before:  o = torch_linear_attention(q, k, v, g)                                                   # from zeros
After:   o = torch_cached_linear_attention(q, k, v, g, *state metadata, linear_state_i)
with linear_state_i a new graph input of [max_batch_size + 1, heads, k_head_dim, v_head_dim] in float32.
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
    k, v = node.args[1], node.args[2]
    _, _, h, dk = k.meta["val"].shape
    return StateSpec((int(h), int(dk), int(v.meta["val"].shape[-1])), torch.float32)


@TransformRegistry.register("insert_cached_linear_attention")
class InsertCachedLinearAttention(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        n = swap_for_cached_state_op(
            "insert_cached_linear_attention", mod, cm, torch.ops.auto_deploy.torch_linear_attention,
            torch.ops.auto_deploy.torch_cached_linear_attention.default, "linear_state", 4, _spec,
        )
        if not n:
            return mod, TransformInfo(skipped=True, reason="no torch_linear_attention in the graph")
        return mod, TransformInfo(num_matches=n)
