"""export_to_gm (stage export): torch.export the meta model into a GraphModule with dynamic batch and sequence."""

import torch
import torch.nn as nn
from torch.fx import GraphModule

from ...errors import CompileError
from ...export import torch_export_to_gm
from ...models.factory import ModelFactory
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry


@TransformRegistry.register("export_to_gm")
class ExportToGm(BaseTransform):
    """Before: an nn.Module with forward(input_ids, position_ids) -> logits (parameters on meta).

    After: a GraphModule of aten ops called the same way; parameters keep their names (HF checkpoint
    keys) and stay on meta until load_weights. The example inputs are the factory's, moved to the
    parameters' device, with batch and sequence dimensions dynamic.
    """

    def _apply(
        self, mod: nn.Module, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[nn.Module, TransformInfo]:
        if isinstance(mod, GraphModule):
            return mod, TransformInfo(skipped=True, reason="already a GraphModule")
        if factory is None:
            raise CompileError("export_to_gm needs a model factory for its example inputs")
        device = next((p.device for p in mod.parameters()), torch.device("cpu"))
        kwargs = {k: v.to(device) for k, v in factory.get_example_inputs().items()}
        gm = torch_export_to_gm(
            mod,
            kwargs=kwargs,
            strict=self.config.strict,
            patch_list=self.config.patch_list,
            clone_state_dict=self.config.clone_state_dict,
        )
        return gm, TransformInfo(num_matches=1)
