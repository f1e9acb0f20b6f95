"""insert_cached_ssm_attention: swap each torch_ssm (Mamba2 scan) for the version that keeps SSM state per sequence.

Before:  y = torch_ssm(x, dt, A, B, C, D, dt_bias, chunk_size, dt_min, dt_max)                    # from zeros
After:   y = torch_cached_ssm(x, dt, A, B, C, D, dt_bias, *state metadata, ssm_state_i, chunk_size, dt_min, dt_max)
with ssm_state_i a new graph input of [max_batch_size + 1, heads, head_dim, state_size] (float32: the state
accumulates over the whole sequence, so it stays in full precision whatever the model's dtype).
"""

import torch
from ad_compiler.transform.interface import TransformRegistry
from torch.fx import Node

from ...kv_cache.interface import StateSpec
from ..cached_state import CachedStateTransform


@TransformRegistry.register("insert_cached_ssm_attention")
class InsertCachedSsmAttention(CachedStateTransform):
    op, cached_op = "torch_ssm", "torch_cached_ssm"
    state_name, num_tensors = "ssm_state", 7

    @staticmethod
    def state_spec(node: Node) -> StateSpec:
        x, B = node.args[0], node.args[3]
        _, _, h, p = x.meta["val"].shape
        return StateSpec((int(h), int(p), int(B.meta["val"].shape[-1])), torch.float32)
