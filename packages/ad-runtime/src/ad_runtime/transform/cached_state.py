"""What the state-cache transforms share: swap every call of a state op for its cached version.

Each `insert_cached_<op>` transform (SSM scan, causal conv, gated delta rule, linear attention) turns
    out = op(*tensors, *scalars)                      (from a zero state)
into
    out = cached_op(*tensors, *state metadata, <name>_<layer>, *scalars)
where the state metadata inputs are shared by all of them and `<name>_<layer>` is a new graph input of
[max_batch_size + 1, *spec.shape] registered on the cm (one row per running sequence plus a scratch row).
"""

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from ad_compiler.transform.interface import TransformInfo
from ad_compiler.utils.graph_utils import graph_inputs, nodes_calling, run_shape_prop
from torch.fx import GraphModule, Node

from .. import state as _state  # noqa: F401 - registers the cached state ops
from ..kv_cache.interface import CachedSequenceInterface, StateSpec
from ..state.runner import STATE_METADATA
from .graph_transform import GraphTransform


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


def kv_state_spec(node: Node) -> StateSpec:
    """The state of a linear-attention-like op (k, v its second and third arguments, [b, s, heads, head dim]):
    [heads, k_head_dim, v_head_dim] in float32 (it accumulates over the whole sequence, whatever the dtype)."""
    k, v = node.args[1], node.args[2]
    _, _, h, dk = k.meta["val"].shape
    return StateSpec((int(h), int(dk), int(v.meta["val"].shape[-1])), torch.float32)


class CachedStateTransform(GraphTransform):
    """An `insert_cached_<op>` transform: swap every call of `op` for `cached_op` (both in torch.ops.auto_deploy).

    `num_tensors` leading arguments go before the metadata, the rest after the state input `<state_name>_<layer>`;
    `state_spec(node)` gives the per-sequence state shape and dtype from the node's argument shapes.
    """

    op: ClassVar[str]
    cached_op: ClassVar[str]
    state_name: ClassVar[str]
    num_tensors: ClassVar[int]

    @abstractmethod
    def state_spec(self, node: Node) -> StateSpec:
        """The per-sequence state of `node` (a call of `op`)."""

    def _rewrite(self, gm: GraphModule, cm: CachedSequenceInterface) -> tuple[GraphModule, TransformInfo]:
        sources = nodes_calling(gm, getattr(torch.ops.auto_deploy, self.op))
        if not sources:
            return gm, TransformInfo(skipped=True, reason=f"no {self.op} in the graph")
        if any("val" not in a.meta for n in sources for a in n.all_input_nodes):
            run_shape_prop(gm)  # a transform that left new nodes without shapes: refresh them once
        cached_op, k = getattr(torch.ops.auto_deploy, self.cached_op).default, self.num_tensors
        meta = state_metadata_inputs(gm, cm)
        for layer, node in enumerate(sources):
            state = add_state_input(gm, cm, f"{self.state_name}_{layer}", self.state_spec(node))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(cached_op, (*node.args[:k], *meta, state, *node.args[k:]))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        gm.recompile()
        return gm, TransformInfo(num_matches=len(sources))
