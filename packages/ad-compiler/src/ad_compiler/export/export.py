"""torch.export capture into a GraphModule whose state-dict keys equal the source model's."""

from typing import Any

import torch
import torch.nn as nn
from torch.fx import GraphModule


def torch_export_to_gm(
    model: nn.Module,
    args: tuple = (),
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> GraphModule:
    """Export `model` and return the unlifted GraphModule (parameters as attributes, aten ops)."""
    with torch.inference_mode(False), torch.no_grad():
        ep = torch.export.export(model, args, kwargs or {}, dynamic_shapes=dynamic_shapes, strict=strict)
    gm = ep.module()
    return gm
