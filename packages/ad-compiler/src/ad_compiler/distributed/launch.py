"""Start one process per rank (or join a torchrun launch) and fail fast: one rank's error ends them all."""

import datetime
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import CompileError

logger = logging.getLogger(__name__)

# Collectives that wait longer than this on a dead peer raise instead of hanging.
DEFAULT_PG_TIMEOUT_S = 60.0


class DistributedError(CompileError):
    """A rank failed (its traceback is in the message), or the ranks did not finish in time."""


@dataclass(frozen=True)
class RankContext:
    """Who this process is in the group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def device(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def default_backend() -> str:
    """NCCL where there are GPUs, gloo on CPUs."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def free_port() -> int:
    """An unused TCP port on localhost for the rendezvous (bind 0 asks the kernel for one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_context() -> RankContext | None:
    """The rank this process was given by torchrun (RANK/WORLD_SIZE/MASTER_ADDR set), else None."""
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local = int(env.get("LOCAL_RANK", rank))
    return RankContext(rank=rank, world_size=world, local_rank=local, backend=default_backend())


def init_process_group(
    rank: int,
    world_size: int,
    port: int | None = None,
    backend: str | None = None,
    timeout_s: float = DEFAULT_PG_TIMEOUT_S,
) -> RankContext:
    """Join the default process group (env:// when torchrun set it up, else tcp://127.0.0.1:port)."""
    backend = backend or default_backend()
    ctx = RankContext(rank=rank, world_size=world_size, local_rank=rank, backend=backend)
    if dist.is_initialized():
        return ctx
    if backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
    init = "env://" if port is None else f"tcp://127.0.0.1:{port}"
    dist.init_process_group(
        backend=backend,
        init_method=init,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return ctx


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    args: tuple,
    results: Any,
    pg_timeout_s: float,
    forked: bool,
) -> None:
    if forked:
        # A forked child must not enter the parent's OpenMP pool (it would wait forever on its threads).
        torch.set_num_threads(1)
    try:
        ctx = init_process_group(rank, world_size, port, backend, pg_timeout_s)
        out = fn(ctx, *args)
        # Plain pickle copies tensors by value; torch's queue pickler would share memory with a process
        # that is about to exit.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent with its traceback
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(procs: list[mp.process.BaseProcess], grace_s: float = 3.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    backend: str | None = None,
    start_method: str = "spawn",
    timeout_s: float = 300.0,
    pg_timeout_s: float = DEFAULT_PG_TIMEOUT_S,
) -> list[Any]:
    """Run `fn(ctx: RankContext, *args)` in `world_size` processes; return their results in rank order.

    The first rank to fail (exception or non-zero exit) stops the others and raises DistributedError
    with that rank's traceback; so does running past `timeout_s`. With start_method "fork" the ranks
    inherit the parent's objects (e.g. an exported graph) without pickling them.
    """
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise DistributedError(f"world_size {world_size} needs {world_size} GPUs, found {torch.cuda.device_count()}")
    mp_ctx = mp.get_context(start_method)
    results = mp_ctx.SimpleQueue() if start_method == "fork" else mp_ctx.Queue()
    port = free_port()
    procs = [
        mp_ctx.Process(
            target=_rank_main,
            args=(fn, rank, world_size, port, backend, args, results, pg_timeout_s, start_method == "fork"),
            name=f"rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    done: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(done) < world_size:
            while not results.empty():
                rank, ok, payload = results.get()
                if not ok:
                    raise DistributedError(f"rank {rank} of {world_size} failed:\n{payload}")
                done[rank] = pickle.loads(payload)
            if len(done) == world_size:
                break
            dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in done]
            if dead:
                time.sleep(0.2)  # its traceback may still be on the way through the queue
                if not results.empty():
                    continue
                rank, code = dead[0]
                hint = ""
                if start_method == "spawn" and code == 1:
                    # The usual cause: the spawned child re-ran an unguarded script that starts ranks again.
                    hint = "; its error is on stderr (a script that starts ranks needs `if __name__ == \"__main__\":`)"
                raise DistributedError(f"rank {rank} of {world_size} exited with code {code} and no message{hint}")
            if time.monotonic() > deadline:
                raise DistributedError(f"ranks did not finish within {timeout_s:.0f}s; finished: {sorted(done)}")
            multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()], timeout=0.1)
    finally:
        _stop(procs)
    return [done[r] for r in range(world_size)]

