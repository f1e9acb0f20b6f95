"""Device facts the runtime decides on: is this a GPU run, and how much memory is free."""

import torch


def free_and_total_memory(device: str | torch.device) -> tuple[int, int]:
    """(free, total) bytes on a CUDA device, after returning the allocator's unused blocks to the driver."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)


def min_over_ranks(value: int, device: str | torch.device) -> int:
    """The minimum of `value` over all ranks (the value itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    # NCCL reduces only device tensors; gloo only CPU ones.
    dev = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.int64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
