"""cleanup_noop_to (stage post_export): drop casts to the dtype a tensor already has (x.to(x.dtype) is x itself).

Model code casts back to the input's dtype after mixed-precision math (Olmo2's RoPE: `q_embed.to(q_type)`); export
keeps the call as `aten.to.dtype` even where both dtypes agree, and a no-op between two ops hides their pattern from
the matchers (the RoPE layout rewrite, the RoPE fusion into the cached attention).
"""

import torch
from torch.fx import GraphModule

from ...models.factory import ModelFactory
from ...utils.graph_utils import arg, nodes_calling, val
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

TO_DTYPE = torch.ops.aten.to.dtype


@TransformRegistry.register("cleanup_noop_to")
class CleanupNoopTo(BaseTransform):
    """Before: y = aten.to.dtype(x, d) with x of dtype d.  After: uses of y read x.

    Only the plain form (no copy=True, no memory_format): that call returns x itself, so nothing changes.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        count = 0
        for node in nodes_calling(gm, TO_DTYPE):
            x, dtype = node.args[0], arg(node, 1, "dtype")
            source = val(x)
            if not isinstance(source, torch.Tensor) or source.dtype != dtype:
                continue
            if arg(node, 3, "copy", False) or arg(node, 4, "memory_format", None) is not None:
                continue
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
            count += 1
        return gm, TransformInfo(num_matches=count)
