"""Swap the reference torch_moe for torch_moe_fused with weights pre-transposed for grouped GEMMs.

Before: out = torch_moe(x, idx, w, experts.gate_up_proj [E,2I,H], experts.down_proj [E,H,I], act)
After:  out = torch_moe_fused(x, idx, w, experts.gate_up_proj_t [E,H,2I], experts.down_proj_t [E,I,H], act)
The transposed copies replace the original parameters (this runs after weights are loaded), so memory
does not grow.
"""

import torch
from torch.fx import GraphModule, Node

from ... import custom_ops  # noqa: F401 - registers torch.ops.auto_deploy.*
from ...models.factory import ModelFactory
from ...utils.graph_utils import get_attr_tensor, nodes_calling
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


def _set_param(gm: GraphModule, target: str, tensor: torch.Tensor) -> None:
    owner, _, name = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    mod.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))


def _drop_param(gm: GraphModule, target: str) -> None:
    owner, _, name = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    delattr(mod, name)


def _transposed_attr(gm: GraphModule, weight: Node, cache: dict[str, Node]) -> Node:
    """A get_attr of the contiguous [E, in, out] copy of `weight` ([E, out, in]); one copy per parameter."""
    if weight.target not in cache:
        new_target = f"{weight.target}_t"
        _set_param(gm, new_target, get_attr_tensor(gm, weight.target).detach().transpose(1, 2).contiguous())
        with gm.graph.inserting_after(weight):
            cache[weight.target] = gm.graph.get_attr(new_target)
    return cache[weight.target]


@TransformRegistry.register("fuse_moe")
class FuseMoe(BaseTransform):
    """torch_moe -> torch_moe_fused (one grouped GEMM per projection instead of a loop over experts)."""

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        cache: dict[str, Node] = {}
        old_weights: set[Node] = set()
        num = 0
        for node in nodes_calling(gm, torch.ops.auto_deploy.torch_moe):
            x, selected, weights, gate_up, down, *rest = node.args
            if not all(isinstance(w, Node) and w.op == "get_attr" for w in (gate_up, down)):
                continue  # weights computed in the graph (e.g. sliced at run time): leave the reference op
            act = rest[0] if rest else node.kwargs.get("act_fn", "silu")
            gate_up_t, down_t = _transposed_attr(gm, gate_up, cache), _transposed_attr(gm, down, cache)
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(
                    torch.ops.auto_deploy.torch_moe_fused.default, (x, selected, weights, gate_up_t, down_t, act)
                )
            fused.meta.update(node.meta)
            node.replace_all_uses_with(fused)
            gm.graph.erase_node(node)
            old_weights |= {gate_up, down}
            num += 1
        for w in old_weights:
            if not w.users:
                gm.graph.erase_node(w)
                if not any(n.op == "get_attr" and n.target == w.target for n in gm.graph.nodes):
                    _drop_param(gm, w.target)
        gm.recompile()
        return gm, TransformInfo(num_matches=num)
