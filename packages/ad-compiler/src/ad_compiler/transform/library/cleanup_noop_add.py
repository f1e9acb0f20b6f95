"""cleanup_noop_add (stage post_export): drop additions of zeros (x + 0, x + zeros) that do not change x."""

from typing import Any

import torch
from torch.fx import GraphModule, Node

from ...models.factory import ModelFactory
from ...utils.graph_utils import nodes_calling
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten
_ZERO_FILL = (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default)


def _is_zero(arg: Any) -> bool:
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return arg == 0
    if isinstance(arg, Node) and arg.op == "call_function":
        if arg.target in _ZERO_FILL:
            return True
        if arg.target in (aten.full.default, aten.full_like.default):
            return arg.args[1] == 0
    return False


def _shape_dtype(node: Any) -> tuple[Any, Any] | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None


@TransformRegistry.register("cleanup_noop_add")
class CleanupNoopAdd(BaseTransform):
    """Before: y = aten.add(x, zeros(...)) or aten.add(x, 0).  After: uses of y read x.

    Only when y has x's shape and dtype (known from export metadata): adding zeros may broadcast or
    promote, and then it is not a no-op.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        count = 0
        for node in nodes_calling(gm, aten.add.Tensor):
            a, b = node.args[:2]
            if node.kwargs.get("alpha", 1) != 1 and not _is_zero(b):
                continue
            keep = a if _is_zero(b) else b if _is_zero(a) else None
            if not isinstance(keep, Node):
                continue
            out, inp = _shape_dtype(node), _shape_dtype(keep)
            if out is None or out != inp:
                continue
            node.replace_all_uses_with(keep)
            gm.graph.erase_node(node)
            count += 1
        return gm, TransformInfo(num_matches=count)
