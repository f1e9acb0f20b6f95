"""insert_cached_linear_attention: swap each torch_linear_attention for the version with per-sequence state.

Before:  o = torch_linear_attention(q, k, v, g)                                                   # from zeros
After:   o = torch_cached_linear_attention(q, k, v, g, *state metadata, linear_state_i)
with linear_state_i a new graph input of [max_batch_size + 1, heads, k_head_dim, v_head_dim] in float32.
"""

from ad_compiler.transform.interface import TransformRegistry

from ..cached_state import CachedStateTransform, kv_state_spec


@TransformRegistry.register("insert_cached_linear_attention")
class InsertCachedLinearAttention(CachedStateTransform):
    op, cached_op = "torch_linear_attention", "torch_cached_linear_attention"
    state_name, num_tensors = "linear_state", 4
    state_spec = staticmethod(kv_state_spec)
