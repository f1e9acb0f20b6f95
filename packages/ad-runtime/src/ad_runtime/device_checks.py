"""Checks of the configuration against the resolved device, run before the build exports anything."""

from typing import TYPE_CHECKING

import torch
from ad_config import refuse_gpu_only_backends

if TYPE_CHECKING:
    from ad_config import LlmArgs


def check_backends_for_device(args: "LlmArgs", device: torch.device) -> None:
    """A ConfigError naming the backend and the device when `args` asks for a GPU-only backend (Triton,
    FlashInfer, CUDA graphs) and `device` is not a CUDA GPU; otherwise nothing."""
    if device.type == "cuda":
        return
    if args.device == "auto":
        target = f"{device.type} (device 'auto', no CUDA GPU visible)"
    else:
        target = f"device {args.device!r}"
    refuse_gpu_only_backends(args, target)
