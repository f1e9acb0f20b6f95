"""insert_cached_gated_delta_rule: swap each torch_gated_delta_rule for the version with per-sequence state.

Before:  o = torch_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm)                              # from zeros
After:   o = torch_cached_gated_delta_rule(q, k, v, g, beta, *state metadata, delta_state_i, use_qk_l2norm)
with delta_state_i a new graph input of [max_batch_size + 1, heads, k_head_dim, v_head_dim] in float32 (the
state accumulates over the whole sequence, so it stays in full precision whatever the model's dtype).
"""

from ad_compiler.transform.interface import TransformRegistry

from ..cached_state import CachedStateTransform, kv_state_spec


@TransformRegistry.register("insert_cached_gated_delta_rule")
class InsertCachedGatedDeltaRule(CachedStateTransform):
    op, cached_op = "torch_gated_delta_rule", "torch_cached_gated_delta_rule"
    state_name, num_tensors = "delta_state", 5
    state_spec = staticmethod(kv_state_spec)
