"""What the state-cache transforms share: swap every call of a state op for its cached version.

Each `insert_cached_<op>` transform (SSM scan, causal conv, gated delta rule, linear attention) turns
    out = op(*tensors, *scalars)                      (from a zero state)
into
    out = cached_op(*tensors, *state metadata, <name>_<layer>, *scalars)
where the state metadata inputs are shared by all of them and `<name>_<layer>` is a new graph input of
[max_batch_size + 1, *spec.shape] registered on the cm (one row per running sequence plus a scratch row).
"""

from collections.abc import Callable
from typing import Any

import torch
from ad_compiler.errors import CompileError
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.utils.graph_utils import graph_inputs, nodes_calling, run_shape_prop
from torch.fx import GraphModule, Node

from ..kv_cache.interface import CachedSequenceInterface, StateSpec
from ..state.runner import STATE_METADATA


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


def swap_for_cached_state_op(
    transform: str, mod: Any, cm: CacheInterface | None, op: Any, cached_op: Any, state_name: str, num_tensors: int,
    spec_of: Callable[[Node], StateSpec],
) -> int:
    """Swap every call of `op` in `mod` for `cached_op`; returns how many (0: none in the graph).

    `num_tensors` leading arguments go before the metadata, the rest after the state; `spec_of(node)` gives
    the per-sequence state shape and dtype from the node's argument shapes.
    """
    if not isinstance(cm, CachedSequenceInterface):
        raise CompileError(f"{transform} needs the runtime's CachedSequenceInterface (cm)")
    if not isinstance(mod, GraphModule):
        raise CompileError(f"{transform} needs an exported GraphModule")
    gm = mod
    sources = nodes_calling(gm, op)
    if not sources:
        return 0
    if any("val" not in a.meta for n in sources for a in n.all_input_nodes):
        run_shape_prop(gm)  # a transform that left new nodes without shapes: refresh them once
    meta = state_metadata_inputs(gm, cm)
    for layer, node in enumerate(sources):
        state = add_state_input(gm, cm, f"{state_name}_{layer}", spec_of(node))
        args = node.args
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(cached_op, (*args[:num_tensors], *meta, state, *args[num_tensors:]))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return len(sources)
