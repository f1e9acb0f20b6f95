"""fuse_gemv_epilogue: the add+RMSNorm that reads a one-row GEMV's output runs at the end of that GEMV.

Before:  y = triton_gemv_linear(x, W, b);  normed, summed = triton_fused_add_rmsnorm(y, residual, w, eps)
After:   normed, summed = triton_gemv_add_rmsnorm(x, W, b, residual, w, eps)

A Llama layer at batch 1 has two such pairs (o_proj before the post-attention norm, down before the next layer's
input norm): 64 one-program add+RMSNorm kernels a step for Llama-3.1-8B, each a launch and a wait on the GEMV
before it. In the fused kernel the GEMV program that finishes last normalises the row (the others have stored
their parts of it), with the same rounding as the unfused kernels. Calls with more rows run aten.linear and the
unfused add_rmsnorm as before. Runs after gemv_decode_linear, whose ops it rewrites.
"""

import torch
import torch.nn as nn
from ad_compiler.errors import CompileError
from ad_compiler.models.factory import ModelFactory
from ad_compiler.transform.cache_protocol import CacheInterface
from ad_compiler.transform.interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry
from ad_compiler.utils.graph_utils import arg, is_op, nodes_calling
from torch.fx import GraphModule, Node

from ...kernels import ops  # noqa: F401 - defines the fused GEMV ops

GEMV = torch.ops.auto_deploy.triton_gemv_linear.default
ADD_RMSNORM = torch.ops.auto_deploy.triton_fused_add_rmsnorm.default
GEMV_ADD_RMSNORM = torch.ops.auto_deploy.triton_gemv_add_rmsnorm.default


def _gemv_operand(norm: Node) -> tuple[Node, object] | None:
    """(the GEMV, the other summand) when one summand of the norm is a GEMV read by nothing else (x + residual is
    one fp32 addition either way round, so either operand may be the GEMV)."""
    x, residual = arg(norm, 0, "x"), arg(norm, 1, "residual")
    for mine, other in ((x, residual), (residual, x)):
        if isinstance(mine, Node) and is_op(mine, GEMV) and len(mine.users) == 1:
            return mine, other
    return None


@TransformRegistry.register("fuse_gemv_epilogue")
class FuseGemvEpilogue(BaseTransform):
    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if not isinstance(mod, GraphModule):
            raise CompileError("fuse_gemv_epilogue needs an exported GraphModule")
        gm, num = mod, 0
        for norm in nodes_calling(gm, ADD_RMSNORM):
            found = _gemv_operand(norm)
            if found is None:
                continue
            gemv, residual = found
            inputs = (arg(gemv, 0, "input"), arg(gemv, 1, "weight"), arg(gemv, 2, "bias"))
            with gm.graph.inserting_before(norm):
                fused = gm.graph.call_function(
                    GEMV_ADD_RMSNORM, (*inputs, residual, arg(norm, 2, "weight"), arg(norm, 3, "eps"))
                )
            fused.meta.update(norm.meta)  # the same (normed, summed) outputs
            norm.replace_all_uses_with(fused)
            gm.graph.erase_node(norm)
            gm.graph.erase_node(gemv)
            num += 1
        if num:
            gm.recompile()
        return gm, TransformInfo(num_matches=num)
