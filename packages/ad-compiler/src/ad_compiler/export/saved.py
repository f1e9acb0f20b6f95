"""Save the transformed graph as a torch.export program (model.pt2) loadable after `import ad_compiler`."""

from pathlib import Path

import torch
import torch.nn as nn

from .export import dynamic_batch_seq_shapes


def save_program(module: nn.Module, example_inputs: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Re-export `module` (called as module(**example_inputs), dynamic batch/seq) and torch.export.save it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        ep = torch.export.export(
            module, (), dict(example_inputs), dynamic_shapes=dynamic_batch_seq_shapes(example_inputs), strict=False
        )
    torch.export.save(ep, str(path))
    return path

