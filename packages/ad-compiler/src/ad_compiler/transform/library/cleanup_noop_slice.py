"""cleanup_noop_slice (stage post_export): drop slices that take a whole dimension."""

import sys

import torch
from torch.fx import GraphModule, Node

from ...models.factory import ModelFactory
from ...utils.graph_utils import nodes_calling
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


def _is_noop_slice(node: Node) -> bool:
    args = list(node.args) + [None] * (5 - len(node.args))
    src, dim, start, end, step = args[:5]
    dim = node.kwargs.get("dim", dim) or 0
    start = node.kwargs.get("start", start)
    end = node.kwargs.get("end", end)
    step = node.kwargs.get("step", step)
    if start not in (None, 0) or step not in (None, 1):
        return False
    if end in (None, sys.maxsize):  # Python `x[:, 0:]`
        return True
    # A literal end at or past a static dim size also takes everything; symbolic ends may cut.
    val = src.meta.get("val") if isinstance(src, Node) else None
    size = val.shape[dim] if isinstance(val, torch.Tensor) else None
    return isinstance(end, int) and isinstance(size, int) and end >= size


@TransformRegistry.register("cleanup_noop_slice")
class CleanupNoopSlice(BaseTransform):
    """Before: y = aten.slice(x, dim, 0, 9223372036854775807); z = f(y).  After: z = f(x)."""

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        count = 0
        for node in nodes_calling(gm, torch.ops.aten.slice.Tensor):
            if _is_noop_slice(node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                count += 1
        return gm, TransformInfo(num_matches=count)
