"""insert_cached_ssm_attention: swap each torch_ssm (Mamba2 scan) for the version that keeps SSM state per sequence.

Before:  y = torch_ssm(x, dt, A, B, C, D, dt_bias, chunk_size, dt_min, dt_max)                    # from zeros
After:   y = torch_cached_ssm(x, dt, A, B, C, D, dt_bias, *state metadata, ssm_state_i, chunk_size, dt_min, dt_max)
with ssm_state_i a new graph input of [max_batch_size + 1, heads, head_dim, state_size] (float32: the state
accumulates over the whole sequence, so it stays in full precision whatever the model's dtype).
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
    x, B = node.args[0], node.args[3]
    _, _, h, p = x.meta["val"].shape
    return StateSpec((int(h), int(p), int(B.meta["val"].shape[-1])), torch.float32)


@TransformRegistry.register("insert_cached_ssm_attention")
class InsertCachedSsmAttention(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        n = swap_for_cached_state_op(
            "insert_cached_ssm_attention", mod, cm, torch.ops.auto_deploy.torch_ssm,
            torch.ops.auto_deploy.torch_cached_ssm.default, "ssm_state", 7, _spec,
        )
        if not n:
            return mod, TransformInfo(skipped=True, reason="no torch_ssm in the graph")
        return mod, TransformInfo(num_matches=n)
