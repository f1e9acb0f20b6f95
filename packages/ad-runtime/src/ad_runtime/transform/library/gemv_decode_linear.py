"""gemv_decode_linear: on a CUDA GPU, linear layers multiply a one-row input with a Triton GEMV, more rows with cuBLAS.

Before:  y = aten.linear(x, weight, bias)
After:   y = auto_deploy::triton_gemv_linear(x, weight, bias)   # one row: Triton GEMV; more rows: aten.linear

A batch-1 decode step reads every weight once for one row; cuBLAS splits K for such products and adds a reduce
kernel per linear (about 130 extra kernels a step for Llama-3.1-8B), where the GEMV reads each weight once and
writes its outputs directly. The op decides by the row count of each call, so captured batch-1 decode graphs
hold the GEMV and prefill, mixed and larger decode batches run exactly as before.
"""

import torch
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import arg, node_tensor, nodes_calling
from torch.fx import GraphModule, Node

from ...kernels import ops  # noqa: F401 - defines auto_deploy::triton_gemv_linear
from ..graph_transform import GraphTransform

LINEAR = torch.ops.aten.linear.default
GEMV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def skip_reason(device: str | torch.device | None) -> str | None:
    """Why the rewrite does not apply to a graph run on `device`, or None where it does."""
    if device is None:
        return "no cache interface: the graph is not built to run here"
    if torch.device(device).type != "cuda":
        return f"the model runs on {device}, not a CUDA GPU"
    return None


def _rewritable(gm: GraphModule, node: Node) -> bool:
    """A linear with a 2-D weight in a dtype the GEMV handles (others keep aten.linear, and cuBLAS)."""
    w = node_tensor(gm, arg(node, 1, "weight"))
    return isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype in GEMV_DTYPES


@TransformRegistry.register("gemv_decode_linear")
class GemvDecodeLinear(GraphTransform):
    needs_cm = False

    def _rewrite(self, gm: GraphModule, cm: CacheInterface | None) -> tuple[GraphModule, TransformInfo]:
        reason = skip_reason(getattr(cm, "device", None))
        if reason is not None:
            return gm, TransformInfo(skipped=True, reason=reason)
        num = 0
        for node in nodes_calling(gm, LINEAR):
            if not _rewritable(gm, node):
                continue
            x, weight, bias = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.auto_deploy.triton_gemv_linear.default, (x, weight, bias))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            num += 1
        if num:
            gm.recompile()
        return gm, TransformInfo(num_matches=num)
