"""insert_cached_causal_conv: swap each torch_causal_conv1d (Mamba2 conv) for the version with conv state per sequence.

Before:  y = torch_causal_conv1d(x, weight, bias)                                   # x [b, s, c], zeros before
After:   y = torch_cached_causal_conv1d(x, weight, bias, *state metadata, conv_state_i)
with conv_state_i a new graph input of [max_batch_size + 1, channels, kernel - 1] in x's dtype (the last inputs).
"""

from typing import Any

import torch
import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import nodes_calling, run_shape_prop
from torch.fx import GraphModule

from ...kv_cache.interface import CachedSequenceInterface, StateSpec
from .insert_cached_ssm_attention import add_state_input, state_metadata_inputs


@TransformRegistry.register("insert_cached_causal_conv")
class InsertCachedCausalConv(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: Any, factory: Any, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if not isinstance(cm, CachedSequenceInterface):
            raise CompileError("insert_cached_causal_conv needs the runtime's CachedSequenceInterface (cm)")
        if not isinstance(mod, GraphModule):
            raise CompileError("insert_cached_causal_conv needs an exported GraphModule")
        gm = mod
        sources = nodes_calling(gm, torch.ops.auto_deploy.torch_causal_conv1d)
        if not sources:
            return gm, TransformInfo(skipped=True, reason="no torch_causal_conv1d in the graph")
        if any("val" not in a.meta for n in sources for a in n.all_input_nodes):
            run_shape_prop(gm)  # fusions (e.g. fuse_gemms' splits) may leave new inputs without shapes
        meta = state_metadata_inputs(gm, cm)
        for layer, node in enumerate(sources):
            x, weight, bias = node.args
            c, k = weight.meta["val"].shape
            spec = StateSpec((int(c), int(k) - 1), x.meta["val"].dtype)
            state = add_state_input(gm, cm, f"conv_state_{layer}", spec)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(
                    torch.ops.auto_deploy.torch_cached_causal_conv1d.default, (x, weight, bias, *meta, state)
                )
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        gm.recompile()
        return gm, TransformInfo(num_matches=len(sources))
