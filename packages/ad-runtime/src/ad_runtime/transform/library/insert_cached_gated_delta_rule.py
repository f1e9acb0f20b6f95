"""insert_cached_gated_delta_rule: swap each torch_gated_delta_rule for the version with per-sequence state.

Before:  o = torch_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm)                              # from zeros
After:   o = torch_cached_gated_delta_rule(q, k, v, g, beta, *state metadata, delta_state_i, use_qk_l2norm)
with delta_state_i a new graph input of [max_batch_size + 1, heads, k_head_dim, v_head_dim] in float32 (the
state accumulates over the whole sequence, so it stays in full precision whatever the model's dtype).
"""

from typing import Any

import torch
import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import nodes_calling, run_shape_prop
from torch.fx import GraphModule

from ...kv_cache.interface import CachedSequenceInterface, StateSpec
from ...state import torch_linear_attention  # noqa: F401 - registers torch_cached_gated_delta_rule
from .insert_cached_ssm_attention import add_state_input, state_metadata_inputs


@TransformRegistry.register("insert_cached_gated_delta_rule")
class InsertCachedGatedDeltaRule(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: Any, factory: Any, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if not isinstance(cm, CachedSequenceInterface):
            raise CompileError("insert_cached_gated_delta_rule needs the runtime's CachedSequenceInterface (cm)")
        if not isinstance(mod, GraphModule):
            raise CompileError("insert_cached_gated_delta_rule needs an exported GraphModule")
        gm = mod
        sources = nodes_calling(gm, torch.ops.auto_deploy.torch_gated_delta_rule)
        if not sources:
            return gm, TransformInfo(skipped=True, reason="no torch_gated_delta_rule in the graph")
        if any("val" not in a.meta for n in sources for a in n.all_input_nodes):
            run_shape_prop(gm)  # fusions (e.g. fuse_gemms' splits) may leave new inputs without shapes
        meta = state_metadata_inputs(gm, cm)
        for layer, node in enumerate(sources):
            q, k, v, g, beta, use_qk_l2norm = node.args
            _, _, h, dk = k.meta["val"].shape
            dv = v.meta["val"].shape[-1]
            spec = StateSpec((int(h), int(dk), int(dv)), torch.float32)
            state = add_state_input(gm, cm, f"delta_state_{layer}", spec)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(
                    torch.ops.auto_deploy.torch_cached_gated_delta_rule.default,
                    (q, k, v, g, beta, *meta, state, use_qk_l2norm),
                )
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        gm.recompile()
        return gm, TransformInfo(num_matches=len(sources))
