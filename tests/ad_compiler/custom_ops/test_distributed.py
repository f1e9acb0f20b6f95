"""Collectives: identity on one process, sum / concatenation across two gloo processes, export as one node."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import count_calls, export_fn

ops = torch.ops.auto_deploy


def test_identity_without_process_group():
    assert not dist.is_initialized()
    x = torch.randn(3, 4)
    torch.testing.assert_close(ops.torch_dist_all_reduce(x), x)
    torch.testing.assert_close(ops.torch_dist_all_gather(x, 1), x)


def test_export_one_node_each():
    dyn = torch.export.Dim.DYNAMIC
    ep = export_fn(lambda x: ops.torch_dist_all_gather(ops.torch_dist_all_reduce(x), -1), (torch.randn(2, 3),),
                   ({0: dyn},))
    assert count_calls(ep, ops.torch_dist_all_reduce) == 1
    assert count_calls(ep, ops.torch_dist_all_gather) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.full((2, 3), float(rank + 1))
        reduced = torch.ops.auto_deploy.torch_dist_all_reduce(x)
        gathered = torch.ops.auto_deploy.torch_dist_all_gather(x, 1)
        # Plain lists: shared-memory tensors would vanish with this process before the parent reads them.
        results.put((rank, x.tolist(), reduced.tolist(), gathered.tolist()))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks():
    world = 2
    # fork, not spawn: a spawned child re-imports torch, which takes tens of seconds on a busy CPU.
    results = mp.get_context("fork").SimpleQueue()
    mp.start_processes(_worker, args=(world, _free_port(), results), nprocs=world, join=True, start_method="fork")
    by_rank = {}
    for _ in range(world):
        rank, *tensors = results.get()
        by_rank[rank] = [torch.tensor(t) for t in tensors]
    for rank in range(world):
        x, reduced, gathered = by_rank[rank]
        torch.testing.assert_close(x, torch.full((2, 3), float(rank + 1)))  # input left untouched
        torch.testing.assert_close(reduced, torch.full((2, 3), 3.0))
        torch.testing.assert_close(gathered, torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)], 1))
