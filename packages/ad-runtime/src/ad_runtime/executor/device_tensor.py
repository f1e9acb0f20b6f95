"""Small host lists (row indices, per-row parameters) onto the device without waiting for the device."""

from collections.abc import Sequence

import torch


def device_tensor(data: Sequence[int] | Sequence[float], device: torch.device,
                  dtype: torch.dtype = torch.long) -> torch.Tensor:
    """`torch.tensor(data, device=cuda)` copies from pageable memory and so waits for all queued GPU work, which
    would stall overlapped scheduling (the previous step is still running). From pinned memory the copy is queued
    behind that work instead; the caching host allocator keeps the buffer until the copy has run."""
    if device.type != "cuda":
        return torch.tensor(data, dtype=dtype, device=device)
    return torch.tensor(data, dtype=dtype).pin_memory().to(device, non_blocking=True)
