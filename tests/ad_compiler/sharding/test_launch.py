"""The launcher: results in rank order; a rank that raises, dies or stops answering ends the run quickly, named
with its own error in one line; the rendezvous listens on loopback only."""

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from ad_compiler.distributed import DistributedError, RankContext, launch
from ad_compiler.distributed.launch import RankTraceback

# Short, so the stopped-rank tests are quick; far above the ranks' heartbeat gaps on a loaded machine (< 2 s).
DIST_TIMEOUT = 3.0


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
    with pytest.raises(DistributedError) as info:
        launch(_rank1_fails, 2, backend="gloo", start_method="fork", timeout_s=60, dist_timeout=DIST_TIMEOUT)
    assert time.monotonic() - start < 15
    # One line: the rank and its traceback's last line (rank 0's "connection closed" that follows is not it).
    assert str(info.value) == "rank 1 of 2 failed: ValueError: rank one broke" and info.value.rank == 1
    # The whole traceback travels as the cause (printed with --log-level debug).
    cause = info.value.__cause__
    assert isinstance(cause, RankTraceback)
    assert "Traceback (most recent call last)" in str(cause) and 'raise ValueError("rank one broke")' in str(cause)


def _sleeper(ctx: RankContext, pid_dir: Path, in_collective: bool) -> None:
    (pid_dir / str(ctx.rank)).write_text(str(os.getpid()))
    dist.barrier()
    if in_collective:
        dist.barrier()  # rank 0 waits here for rank 1, which never comes
    time.sleep(60)


def _rank1_signals_itself(ctx: RankContext, pid_dir: Path, sig: int, in_collective: bool) -> None:
    if ctx.rank == 1:
        (pid_dir / "1").write_text(str(os.getpid()))
        dist.barrier()
        os.kill(os.getpid(), sig)
        time.sleep(60)
    _sleeper(ctx, pid_dir, in_collective)


def _ended_by(sig: int, in_collective: bool, tmp_path: Path) -> tuple[DistributedError, float, list[int]]:
    start = time.monotonic()
    with pytest.raises(DistributedError) as info:
        launch(_rank1_signals_itself, 2, (tmp_path, sig, in_collective), backend="gloo", start_method="fork",
               timeout_s=120, dist_timeout=DIST_TIMEOUT)
    took = time.monotonic() - start
    pids = [int((tmp_path / str(r)).read_text()) for r in (0, 1)]
    return info.value, took, pids


@pytest.mark.parametrize("in_collective", [True, False], ids=["peer-in-collective", "peer-idle"])
def test_killed_rank_ends_the_run_naming_it(in_collective: bool, tmp_path: Path) -> None:
    err, took, pids = _ended_by(signal.SIGKILL, in_collective, tmp_path)
    # Rank 0's own "connection closed" error follows from the death; the death is what gets named.
    assert str(err).startswith("rank 1 of 2 died: killed by SIGKILL") and err.rank == 1
    assert took < DIST_TIMEOUT + 10
    assert not any(psutil.pid_exists(p) for p in pids)  # killed and reaped


@pytest.mark.parametrize("in_collective", [True, False], ids=["peer-in-collective", "peer-idle"])
def test_stopped_rank_ends_the_run_naming_it(in_collective: bool, tmp_path: Path) -> None:
    err, took, pids = _ended_by(signal.SIGSTOP, in_collective, tmp_path)
    assert str(err) == f"rank 1 of 2 stopped answering for {DIST_TIMEOUT:g} s (dist_timeout)" and err.rank == 1
    assert DIST_TIMEOUT <= took < DIST_TIMEOUT + 10
    assert not any(psutil.pid_exists(p) for p in pids)  # SIGKILL ends a stopped process too; then reaped


def _listening(ctx: RankContext) -> list[tuple[str, int]]:
    t = torch.ones(1)
    dist.all_reduce(t)  # the store and gloo's pairs are all up
    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("tcp") if c.status == "LISTEN"]


def test_rendezvous_listens_on_loopback_only() -> None:
    rank0, rank1 = launch(_listening, 2, backend="gloo", start_method="fork", dist_timeout=DIST_TIMEOUT)
    # Rank 0 serves the rendezvous store (TCPStore's own server would bind every interface); gloo listens too.
    assert rank0 and all(ip == "127.0.0.1" for ip, _ in rank0 + rank1), (rank0, rank1)
    assert len(rank0) > len(rank1)  # the store's socket is rank 0's extra one


def test_timeout_stops_ranks() -> None:
    start = time.monotonic()
    with pytest.raises(DistributedError, match="did not finish"):
        launch(_too_slow, 2, backend="gloo", start_method="fork", timeout_s=3)
    assert time.monotonic() - start < 15


def _env_and_pid(ctx: RankContext, key: str) -> tuple[str | None, int]:
    return os.environ.get(key), os.getppid()


def test_forkserver_ranks_see_the_launchers_environment_of_each_launch(monkeypatch) -> None:
    """The forkserver starts once (with the environment of that moment); each launch's ranks still get the
    launcher's environment as it is then, as spawned ranks would."""
    monkeypatch.setenv("AD_TEST_LAUNCH_MARK", "first")
    first = launch(_env_and_pid, 2, ("AD_TEST_LAUNCH_MARK",), backend="gloo", start_method="forkserver")
    monkeypatch.setenv("AD_TEST_LAUNCH_MARK", "second")
    second = launch(_env_and_pid, 2, ("AD_TEST_LAUNCH_MARK",), backend="gloo", start_method="forkserver")
    assert [v for v, _ in first] == ["first"] * 2 and [v for v, _ in second] == ["second"] * 2
    # Both launches forked from one server process (not from this one).
    parents = {p for _, p in first + second}
    assert len(parents) == 1 and parents != {os.getpid()}


def test_start_method_comes_from_the_environment_when_not_given(monkeypatch) -> None:
    monkeypatch.setenv("AUTODEPLOY_RANK_START_METHOD", "fork")
    assert launch(_env_and_pid, 2, ("X",), backend="gloo")[0][1] == os.getpid()


def test_an_unknown_start_method_in_the_environment_is_a_one_line_error(monkeypatch) -> None:
    monkeypatch.setenv("AUTODEPLOY_RANK_START_METHOD", "thread")
    expected = "^AUTODEPLOY_RANK_START_METHOD='thread': expected spawn, forkserver or fork$"
    with pytest.raises(DistributedError, match=expected):
        launch(_env_and_pid, 2, ("X",), backend="gloo")
