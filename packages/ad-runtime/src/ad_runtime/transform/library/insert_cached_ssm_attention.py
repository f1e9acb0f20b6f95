"""insert_cached_ssm_attention: swap each torch_ssm (Mamba2 scan) for the version that keeps SSM state per sequence.

Before:  y = torch_ssm(x, dt, A, B, C, D, dt_bias, chunk_size, dt_min, dt_max)                    # from zeros
After:   y = torch_cached_ssm(x, dt, A, B, C, D, dt_bias, *state metadata, ssm_state_i, chunk_size, dt_min, dt_max)
with ssm_state_i a new graph input of [max_batch_size + 1, heads, head_dim, state_size] (float32: the state
accumulates over the whole sequence, so it stays in full precision whatever the model's dtype).
"""

from typing import Any

import torch
import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import nodes_calling, run_shape_prop
from torch.fx import GraphModule

from ...kv_cache.interface import CachedSequenceInterface, StateSpec
from ...state.runner import STATE_METADATA
from .insert_cached_attention import graph_inputs


def state_metadata_inputs(gm: GraphModule, cm: CachedSequenceInterface) -> list[Any]:
    """The state metadata placeholders (shared with other cached-op transforms), registered on the cm."""
    example = cm.info.padded_decode_args(1)
    nodes = graph_inputs(gm, list(STATE_METADATA), [example[n].to("meta") for n in STATE_METADATA])
    for name in STATE_METADATA:
        cm.add_metadata(name)
    return nodes


def add_state_input(gm: GraphModule, cm: CachedSequenceInterface, name: str, spec: StateSpec) -> Any:
    cm.add_state(name, spec)
    val = torch.empty(cm.info.max_batch_size + 1, *spec.shape, dtype=spec.dtype, device="meta")
    return graph_inputs(gm, [name], [val])[0]


@TransformRegistry.register("insert_cached_ssm_attention")
class InsertCachedSsmAttention(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: Any, factory: Any, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if not isinstance(cm, CachedSequenceInterface):
            raise CompileError("insert_cached_ssm_attention needs the runtime's CachedSequenceInterface (cm)")
        if not isinstance(mod, GraphModule):
            raise CompileError("insert_cached_ssm_attention needs an exported GraphModule")
        gm = mod
        sources = nodes_calling(gm, torch.ops.auto_deploy.torch_ssm)
        if not sources:
            return gm, TransformInfo(skipped=True, reason="no torch_ssm in the graph")
        if any("val" not in a.meta for n in sources for a in n.all_input_nodes):
            run_shape_prop(gm)  # fusions (e.g. fuse_gemms' splits) may leave new inputs without shapes
        meta = state_metadata_inputs(gm, cm)
        for layer, node in enumerate(sources):
            x, dt, A, B, C, D, dt_bias, chunk_size, dt_min, dt_max = node.args
            _, _, h, p = x.meta["val"].shape
            n = B.meta["val"].shape[-1]
            state = add_state_input(gm, cm, f"ssm_state_{layer}", StateSpec((int(h), int(p), int(n)), torch.float32))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(
                    torch.ops.auto_deploy.torch_cached_ssm.default,
                    (x, dt, A, B, C, D, dt_bias, *meta, state, chunk_size, dt_min, dt_max),
                )
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        gm.recompile()
        return gm, TransformInfo(num_matches=len(sources))
