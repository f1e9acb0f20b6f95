"""Start one process per rank and fail fast: one rank's error ends them all.

A rank ends the run when it raises (its own error is the message), dies (the signal or exit code is), or
stops answering for `dist_timeout` seconds. "Answering" is a heartbeat: every rank runs a daemon thread that
stamps its slot of a shared array; a stopped process (SIGSTOP stops all its threads), or one stuck holding the
interpreter lock, stops stamping, so the launcher, which watches the stamps and the process sentinels, names it
and kills every rank. A rank alive but waiting forever in a collective is ended by the collective's timeout.
"""

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .process_group import (
    DEFAULT_DIST_TIMEOUT_S,
    MIN_PG_TIMEOUT_S,
    PG_TIMEOUT_SLACK_S,
    default_backend,
    init_process_group,
    loopback_listener,
)

logger = logging.getLogger(__name__)

# A spawned rank imports torch (and the caller's modules) before its heartbeat starts: on a loaded machine
# that can take longer than a short dist_timeout.
STARTUP_ALLOWANCE_S = 60.0
# How ranks start when the caller does not say: "spawn" (the default: a fresh interpreter per rank) or
# "forkserver" (one server process imports torch once per parent process; ranks fork from it: a process that
# launches ranks many times, such as the test suite, saves the imports). "fork" is not safe after torch has
# started threads.
START_METHOD_ENV = "AUTODEPLOY_RANK_START_METHOD"
# After the first sign of failure, how long to collect the others (a peer's "connection closed" error often
# arrives together with the death that caused it) before choosing which rank to blame.
FAILURE_GRACE_S = 1.0
# How long finished ranks get to exit by themselves (destroying their process groups) before being killed.
EXIT_GRACE_S = 10.0
# A rank that exited has written its last message already; its reader normally reaches EOF at once (only
# another process holding the pipe's write end, say a fork made meanwhile, delays it). Bound that wait.
EXIT_READ_WAIT_S = 5.0


class DistributedError(RuntimeError):
    """A rank failed, died or stopped answering (`rank` says which), or the ranks did not finish in time.

    The message is one line; for a rank that raised, the rank's own traceback is the `__cause__`.
    """

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


class RankTraceback(Exception):
    """The traceback of an error raised in a rank's process, as text (it cannot cross the process boundary)."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]).rstrip()


def _summary(e: BaseException) -> str:
    """An error as its traceback's last line ("RuntimeError: boom"), cut to the message's first line."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__


def _heartbeat(stamps: Any, rank: int, interval_s: float) -> None:
    parent_pid = os.getppid()
    while True:
        stamps[rank] = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the machine
        if os.getppid() != parent_pid:
            os._exit(1)  # the launcher is gone: nobody will ever collect this rank
        time.sleep(interval_s)


def _private_progress_bar_lock() -> None:
    """Give tqdm a thread lock in this rank instead of the multiprocessing lock it would make on its first bar.

    That lock is a named semaphore registered with the resource tracker the ranks share with the launcher; a
    rank killed after making it leaves it registered, and the tracker warns about a leak when the launcher
    exits. No other process uses a rank's lock, so a thread lock loses nothing.
    """
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, listener: socket.socket | None,
               backend: str, args: tuple, stamps: Any, heartbeat_s: float, pg_timeout_s: float, forked: bool,
               env: dict[str, str] | None, conn: Any) -> None:
    if env is not None:
        # A forkserver child starts with the server's environment, taken when it started: use the launcher's now,
        # as a spawned rank would.
        os.environ.clear()
        os.environ.update(env)
    threading.Thread(target=_heartbeat, args=(stamps, rank, heartbeat_s), name="ad-heartbeat",
                     daemon=True).start()
    if forked:
        # A forked child must not enter the parent's OpenMP pool (it would wait forever on its threads).
        torch.set_num_threads(1)
    _private_progress_bar_lock()
    if sys.platform == "linux":
        # The ranks share one host: gloo's and NCCL's own listening sockets go on the loopback interface too
        # (by default they bind the address the host name resolves to, or the first network interface).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    try:
        if rank != 0 and listener is not None:
            listener.close()  # inherited through fork; only rank 0 serves the store
            listener = None
        ctx = init_process_group(rank, world_size, port, backend, pg_timeout_s, listener)
        out = fn(ctx, *args)
        # Plain pickle copies tensors by value; the multiprocessing pickler would share memory with a
        # process that is about to exit.
        conn.send_bytes(pickle.dumps(("ok", out)))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the launcher with its traceback
        import traceback

        conn.send_bytes(pickle.dumps(("error", time.monotonic(), _summary(e), traceback.format_exc())))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Failure:
    """Why a rank failed; `order` ranks the kinds by how likely each is the root cause (lowest first)."""

    rank: int
    order: int  # 0 died without a word, 1 stopped answering, 2 raised, 3 the whole run ran out of time
    when: float
    message: str
    details: str | None = None  # the rank's traceback


class _Ranks:
    """The launched processes, their result pipes (each read by a thread) and their heartbeat stamps."""

    def __init__(self, mp_ctx: Any, world_size: int):
        self.world_size = world_size
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.readers: list[threading.Thread] = []
        self.events: queue.Queue = queue.Queue()  # (rank, message or None at EOF)
        self.stamps = mp_ctx.RawArray("d", world_size)  # no lock, no semaphore: one writer per slot
        self.started_at = time.monotonic()

    def start(self, mp_ctx: Any, rank: int, target: Callable[..., Any], args: tuple) -> None:
        recv, send = mp_ctx.Pipe(duplex=False)
        p = mp_ctx.Process(target=target, args=(*args, send), name=f"rank{rank}", daemon=True)
        try:
            p.start()
        finally:
            # Ours closed at once: ranks started later do not inherit it, so the rank's exit reads as EOF.
            send.close()
        self.procs.append(p)
        self.conns.append(recv)
        reader = threading.Thread(target=self._read, args=(rank, recv), name=f"ad-rank{rank}-results", daemon=True)
        reader.start()
        self.readers.append(reader)

    def _read(self, rank: int, conn: Any) -> None:
        # A thread per rank: a rank stopped in the middle of sending must not block the watchdog.
        try:
            while True:
                self.events.put((rank, pickle.loads(conn.recv_bytes())))
        except (EOFError, OSError):
            self.events.put((rank, None))
        except Exception as e:  # noqa: BLE001 - an unreadable result is that rank's failure
            self.events.put((rank, ("error", time.monotonic(), f"its result could not be read: {_summary(e)}", None)))

    def silent_for(self, rank: int, now: float) -> tuple[float, float]:
        """(seconds since the rank's last heartbeat, the limit that applies to it)."""
        stamp = self.stamps[rank]
        return (now - stamp, 0.0) if stamp else (now - self.started_at, STARTUP_ALLOWANCE_S)

    def stop(self, kill: bool) -> None:
        """Kill (or, after a clean run, wait for) every rank, then release pipes, threads and processes."""
        if not kill:
            deadline = time.monotonic() + EXIT_GRACE_S
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()  # SIGKILL: also ends a stopped process, which SIGTERM would leave pending
        for p in self.procs:
            p.join(5.0)
            if p.is_alive():
                logger.warning("rank process %d did not exit after SIGKILL", p.pid)
        for reader, conn in zip(self.readers, self.conns):
            reader.join(1.0)  # every writer is gone: EOF ends it
            if not reader.is_alive():
                conn.close()
        for p in self.procs:
            if p.exitcode is not None:
                p.close()


def _died(rank: int, world_size: int, code: int, start_method: str) -> str:
    if code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
            if code == -signal.SIGKILL:
                how += " (by hand, or by the kernel when memory ran out)"
        except ValueError:
            how = f"killed by signal {-code}"
        return f"rank {rank} of {world_size} died: {how}"
    if code == 0:
        return f"rank {rank} of {world_size} exited (code 0) without returning a result"
    hint = ""
    if start_method in ("spawn", "forkserver") and code == 1:
        # The usual cause: the spawned child re-ran an unguarded script that starts ranks again.
        hint = "; its error is on stderr (a script that starts ranks needs `if __name__ == \"__main__\":`)"
    return f"rank {rank} of {world_size} exited with code {code} and no message{hint}"


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    backend: str | None = None,
    start_method: str | None = None,
    timeout_s: float = 300.0,
    dist_timeout: float = DEFAULT_DIST_TIMEOUT_S,
    pg_timeout_s: float | None = None,
    preload: tuple[str, ...] = (),
) -> list[Any]:
    """Run `fn(ctx: RankContext, *args)` in `world_size` processes; return their results in rank order.

    The first rank to fail (exception, death, or no heartbeat for `dist_timeout` seconds) ends every rank
    and raises DistributedError with a one-line reason naming it (for an exception: its last traceback line;
    the full traceback is the error's cause and is logged at debug level); so does running past `timeout_s`.
    Collectives time out after `pg_timeout_s` (default: dist_timeout + 10 s, at least 60 s). With start_method
    "fork" the ranks inherit the parent's objects (e.g. an exported graph) without pickling them. No start_method:
    the AUTODEPLOY_RANK_START_METHOD environment variable, else "spawn". With "forkserver", `preload` names modules
    the ranks will import anyway, for the server to import once (only the launch that starts the server sets them).
    """
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise DistributedError(f"world_size {world_size} needs {world_size} GPUs, found {torch.cuda.device_count()}")
    if dist_timeout <= 0:
        raise ValueError(f"dist_timeout must be positive, got {dist_timeout}")
    if pg_timeout_s is None:
        pg_timeout_s = max(MIN_PG_TIMEOUT_S, dist_timeout + PG_TIMEOUT_SLACK_S)
    heartbeat_s = min(1.0, dist_timeout / 5)
    if start_method is None:
        start_method = os.environ.get(START_METHOD_ENV, "spawn")
        if start_method not in ("spawn", "forkserver", "fork"):
            raise DistributedError(f"{START_METHOD_ENV}={start_method!r}: expected spawn, forkserver or fork")
    mp_ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # The server imports the rank's module once (torch with it); every later launch forks a ready process.
        mp_ctx.set_forkserver_preload([*preload, fn.__module__])
    forked = start_method == "fork"
    env = dict(os.environ) if start_method == "forkserver" else None
    ranks = _Ranks(mp_ctx, world_size)
    listener = loopback_listener()
    port = int(listener.getsockname()[1])
    failed = True
    try:
        try:
            for rank in range(world_size):
                # Rank 0 gets the listening socket; with fork every rank inherits it anyway (and closes it).
                sock = listener if rank == 0 or forked else None
                ranks.start(mp_ctx, rank, _rank_main, (fn, rank, world_size, port, sock, backend, args, ranks.stamps,
                                                        heartbeat_s, pg_timeout_s, forked, env))
        finally:
            listener.close()  # rank 0 holds its own copy
        out = _watch(ranks, start_method, timeout_s, dist_timeout)
        failed = False
        return out
    finally:
        ranks.stop(kill=failed)


def _watch(ranks: _Ranks, start_method: str, timeout_s: float, dist_timeout: float) -> list[Any]:
    """Wait for every rank's result; on the first failure, collect the others briefly and raise the root cause."""
    world = ranks.world_size
    done: dict[int, Any] = {}
    failures: dict[int, _Failure] = {}
    exited_at: dict[int, float] = {}
    first_failure: float | None = None
    deadline = ranks.started_at + timeout_s
    while True:
        now = time.monotonic()
        # Before draining: a reader seen finished here has queued everything it will ever read.
        read_all = {r for r, reader in enumerate(ranks.readers) if not reader.is_alive()}
        while not ranks.events.empty():  # this thread is the queue's only consumer
            rank, msg = ranks.events.get_nowait()
            if msg is not None and msg[0] == "ok":  # None: EOF
                done[rank] = msg[1]
            elif msg is not None and rank not in failures:
                _, when, summary, details = msg
                failures[rank] = _Failure(rank, 2, when, f"rank {rank} of {world} failed: {summary}", details)
        for rank, p in enumerate(ranks.procs):
            if rank not in exited_at and p.exitcode is not None:
                exited_at[rank] = now
            if rank in done or rank in failures:
                continue
            if rank in exited_at:
                # Its last message was written before it exited: classify it once its reader has seen the lot.
                if rank in read_all or now - exited_at[rank] > EXIT_READ_WAIT_S:
                    failures[rank] = _Failure(rank, 0, exited_at[rank], _died(rank, world, p.exitcode, start_method))
                continue
            silent, allowance = ranks.silent_for(rank, now)
            if silent > max(dist_timeout, allowance):
                why = f"rank {rank} of {world} stopped answering for {dist_timeout:g} s (dist_timeout)"
                failures[rank] = _Failure(rank, 1, now - silent, why)
        if len(done) == world:
            return [done[r] for r in range(world)]
        if now > deadline and first_failure is None:
            failures[-1] = _Failure(-1, 3, now,
                                    f"ranks did not finish within {timeout_s:.0f}s; finished: {sorted(done)}")
        if failures and first_failure is None:
            first_failure = now
        if first_failure is not None:
            accounted = all(r in done or r in failures for r in range(world))
            reading = any(r in exited_at and r not in done and r not in failures for r in range(world))
            if accounted or (now - first_failure > FAILURE_GRACE_S and not reading):
                raise _blame(list(failures.values()))
        sentinels = [p.sentinel for r, p in enumerate(ranks.procs) if r not in exited_at]
        multiprocessing.connection.wait(sentinels, timeout=0.1) if sentinels else time.sleep(0.1)


def _blame(failures: list[_Failure]) -> DistributedError:
    """The error for the root cause: a death beats a stall beats an exception (others often follow from it)."""
    failures.sort(key=lambda f: (f.order, f.when))
    for f in failures:
        logger.debug("%s%s", f.message, f"\n{f.details}" if f.details else "")
    first = failures[0]
    err = DistributedError(first.message, rank=first.rank if first.rank >= 0 else None)
    if first.details:
        err.__cause__ = RankTraceback(first.details)
    return err
