"""Swap torch_rmsnorm for the configured backend's fused kernel (kernels_registry "rmsnorm")."""

import torch
from torch.fx import GraphModule

from ... import custom_ops  # noqa: F401 - registers torch.ops.auto_deploy.*
from ...kernels_registry import get_kernel
from ...models.factory import ModelFactory
from ...utils.graph_utils import nodes_calling
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


@TransformRegistry.register("fuse_rmsnorm")
class FuseRmsnorm(BaseTransform):
    """Retarget every torch_rmsnorm node to the backend's op (same arguments, same semantics).

    Before:  y = torch_rmsnorm(x, w, eps)
    After:   y = torch_rmsnorm_fused(x, w, eps)      # backend torch (and "auto" without a GPU)
             y = triton_rmsnorm(x, w, eps)           # backend triton, registered by ad_runtime
    The torch backend runs aten's single-kernel rms_norm in fp32 and keeps HF's cast-back-then-weight
    order, so bf16 results match the reference op.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        nodes = nodes_calling(gm, torch.ops.auto_deploy.torch_rmsnorm)
        if not nodes:
            return gm, TransformInfo(num_matches=0)
        # Looked up only when there is work, so a graph without norms never needs the backend installed.
        kernel = get_kernel("rmsnorm", self.config.backend)
        for node in nodes:
            node.target = kernel
        return gm, TransformInfo(num_matches=len(nodes))
