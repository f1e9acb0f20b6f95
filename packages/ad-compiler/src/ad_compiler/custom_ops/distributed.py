"""Canonical collectives on the default process group; identity when not distributed (one rank)."""

import torch
import torch.distributed as dist


def _world_size() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


@torch.library.custom_op("auto_deploy::torch_dist_all_reduce", mutates_args=())
def torch_dist_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over all ranks (a new tensor; the input is left untouched)."""
    out = x.clone()
    if _world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@torch_dist_all_reduce.register_fake
def _all_reduce_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("auto_deploy::torch_dist_all_gather", mutates_args=())
def torch_dist_all_gather(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    world = _world_size()
    if world == 1:
        return x.clone()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=dim)


@torch_dist_all_gather.register_fake
def _all_gather_fake(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = shape[dim] * _world_size()
    return x.new_empty(shape)
