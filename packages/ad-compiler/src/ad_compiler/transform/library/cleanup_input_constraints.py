"""cleanup_input_constraints (stage post_export): drop export's guards and shape/value assertions."""

import torch
from torch.fx import GraphModule

from ...models.factory import ModelFactory
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten
_ASSERT_OPS = {
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range.default,
    aten.sym_constrain_range_for_size.default,
    aten._assert_async.msg,
}


@TransformRegistry.register("cleanup_input_constraints")
class CleanupInputConstraints(BaseTransform):
    """Before: _guards_fn(input_ids, position_ids); aten._assert_scalar(...); ...  After: neither.

    The guards pin the shape ranges of the example inputs; the runtime flattens batches into shapes
    (e.g. [1, 1] in decode) export never saw, and later transforms change what the asserts check.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        count = 0
        for node in list(gm.graph.nodes):
            is_guard = node.op == "call_module" and str(node.target) == "_guards_fn"
            if (is_guard or (node.op == "call_function" and node.target in _ASSERT_OPS)) and not node.users:
                gm.graph.erase_node(node)
                count += 1
        if count:
            gm.delete_all_unused_submodules()
        # ep.module() also installs a forward pre-hook that checks inputs against export's ranges; those
        # start at 2 (0/1 specialisation), so the runtime's [1, T] batches would be rejected.
        for key, hook in list(gm._forward_pre_hooks.items()):
            if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
                del gm._forward_pre_hooks[key]
                count += 1
        return gm, TransformInfo(num_matches=count)
