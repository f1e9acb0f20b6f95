"""Capture models with torch.export into flat FX GraphModules."""

from .export import torch_export_to_gm

__all__ = ["torch_export_to_gm"]
