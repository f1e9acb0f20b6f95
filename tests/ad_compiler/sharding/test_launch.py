"""The launcher: results in rank order, a failing rank ends the run quickly with its error, no hangs."""

import time

import pytest
import torch
import torch.distributed as dist
from ad_compiler.distributed import DistributedError, RankContext, launch, torchrun_context


def _sum_ranks(ctx: RankContext, offset: float) -> float:
    t = torch.tensor([ctx.rank + offset])
    dist.all_reduce(t)
    return t.item()


def _rank1_fails(ctx: RankContext) -> None:
    if ctx.rank == 1:
        raise ValueError("rank one broke")
    dist.barrier()  # the others wait on the dead rank: the launcher must stop them
    time.sleep(60)


def _too_slow(ctx: RankContext) -> None:
    time.sleep(60)


@pytest.mark.parametrize("world", [2, 4])
def test_results_in_rank_order(world: int) -> None:
    out = launch(_sum_ranks, world, (1.0,), backend="gloo", start_method="fork")
    assert out == [sum(range(world)) + world * 1.0] * world


def test_failing_rank_stops_all_with_its_error() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedError, match="rank 1 of 2 failed(.|\n)*rank one broke"):
        launch(_rank1_fails, 2, backend="gloo", start_method="fork", timeout_s=60)
    assert time.monotonic() - start < 15


def test_timeout_stops_ranks() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedError, match="did not finish"):
        launch(_too_slow, 2, backend="gloo", start_method="fork", timeout_s=3)
    assert time.monotonic() - start < 15


def test_torchrun_env_is_joined(monkeypatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert torchrun_context() is None
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(k, v)
    ctx = torchrun_context()
    assert ctx is not None and (ctx.rank, ctx.world_size, ctx.local_rank) == (1, 2, 1)
