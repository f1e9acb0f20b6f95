"""Remove transpose pairs that cancel and contiguous calls on tensors that are already contiguous."""

import torch
from torch.fx import GraphModule, Node

from ...models.factory import ModelFactory
from ...utils.graph_utils import fake, is_op, nodes_calling
from ..attention_utils import is_noop_slice
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten
# Ops whose result is always a fresh contiguous tensor, whatever their inputs' strides (torch_attention
# by contract). Recorded fake strides are not trusted: rewiring upstream can make them stale.
_CONTIGUOUS_RESULT = [torch.ops.auto_deploy.torch_attention, aten.linear, aten.mm, aten.bmm]


def _swapped_dims(node: Node) -> frozenset[int] | None:
    """The (normalised) pair of dims a transpose swaps, or None if unknown rank."""
    val = fake(node)
    if val is None:
        return None
    rank = val.dim()
    return frozenset(d % rank for d in node.args[1:3])


@TransformRegistry.register("eliminate_redundant_transposes")
class EliminateRedundantTransposes(BaseTransform):
    """Cancel `transpose(transpose(x, a, b), a, b)`; drop `contiguous(x)` when x is always contiguous.

    Before: t1 = transpose(x, 1, 2); t2 = transpose(t1, 2, 1); y = f(t2); c = contiguous(o_bsnd); g(c)
    After:  y = f(x); g(o_bsnd)
    x counts as contiguous only when produced by an op that always returns a fresh contiguous tensor,
    so a `view` that needed the copy never loses it.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        num_matches = 0
        for node in nodes_calling(gm, aten.transpose.int):
            inner = node.args[0]
            # A full slice `x[:, :]` or an alias between them changes neither values nor strides.
            while isinstance(inner, Node) and (is_noop_slice(inner) or is_op(inner, aten.alias)):
                inner = inner.args[0]
            if not (isinstance(inner, Node) and is_op(inner, aten.transpose.int)):
                continue
            dims, inner_dims = _swapped_dims(node), _swapped_dims(inner)
            if dims is None or dims != inner_dims or len(dims) != 2:
                continue
            node.replace_all_uses_with(inner.args[0])
            num_matches += 1
        for node in nodes_calling(gm, aten.contiguous):
            src = node.args[0]
            memory_format = node.kwargs.get("memory_format", torch.contiguous_format)
            if memory_format != torch.contiguous_format or not is_op(src, _CONTIGUOUS_RESULT):
                continue
            node.replace_all_uses_with(src)
            num_matches += 1
        return gm, TransformInfo(num_matches=num_matches)
