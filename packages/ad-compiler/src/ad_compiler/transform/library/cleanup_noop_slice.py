"""cleanup_noop_slice (stage post_export): drop slices that take a whole dimension."""

import torch
from torch.fx import GraphModule, Node

from ...models.factory import ModelFactory
from ...utils.graph_utils import OPEN_END, arg, nodes_calling, static_shape
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


def _is_noop_slice(node: Node) -> bool:
    start, end, step = arg(node, 2, "start"), arg(node, 3, "end"), arg(node, 4, "step")
    if start not in (None, 0) or step not in (None, 1):
        return False
    if end in (None, OPEN_END):  # Python `x[:, 0:]`
        return True
    # A literal end at or past a static dim size also takes everything; symbolic ends may cut.
    shape = static_shape(node.args[0])
    size = shape[arg(node, 1, "dim") or 0] if shape is not None else None
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
