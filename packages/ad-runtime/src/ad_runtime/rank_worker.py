"""What every rank of a multi-process run does in its own process: build the sharded engine; rank 0 serves the
user's process over the pipe and broadcasts each step, the others run the steps they receive (see
distributed_backend.py for the protocol). A one-rank launch (`engine_process`) is rank 0 alone, with nothing to
broadcast."""

import contextlib
import dataclasses
import datetime
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from .executor.core import EngineCore
from .kv_cache.interface import StepSequence
from .executor.request import Request
from .executor.request_loop import RequestLoop

# Ranks 1..N-1 wait on the control group for rank 0's next step for as long as the user stays idle; a dead or
# stopped peer is caught by the launcher's watchdog (process sentinels, heartbeats: dist_timeout), not by this.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


class _StepFailed(BaseException):
    """A step failed on rank 0 (its model, or a collective whose peer died).

    The engine fails a failed step's requests and goes on; with several ranks it must not: they run every step
    together, so the others are now a step behind or gone, for good. A BaseException passes the engine's
    `except Exception`, and the rank ends with the step's error (`error`), which ends the run.
    """

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _BroadcastRunner:
    """Rank 0's runner: sends each step to the other ranks before running it itself."""

    def __init__(self, runner: Any, group: Any):
        self.runner, self.group, self.device = runner, group, runner.device

    @property
    def last_greedy(self) -> torch.Tensor | None:
        """The greedy pick rank 0's own graphs made of the last step's logits (see ModelRunner)."""
        return self.runner.last_greedy

    def forward(self, batch: Sequence[StepSequence], num_prefill: int) -> torch.Tensor:
        import torch.distributed as dist

        try:
            dist.broadcast_object_list([(list(batch), num_prefill)], src=0, group=self.group)
            return self.runner.forward(batch, num_prefill)
        except Exception as e:  # noqa: BLE001 - re-raised past the engine's per-step isolation
            raise _StepFailed(e) from e


def _snapshot(req: Request) -> Request:
    """What travels back per update: the prompt stays behind, streams would otherwise resend it every token."""
    return dataclasses.replace(req, prompt_token_ids=[], prompt=None)


def engine_stats(engine: Any) -> tuple[int, int, float]:
    """(requests running, requests waiting, share of KV-cache pages in use) of rank 0's engine after a step."""
    sched = engine.scheduler
    return len(sched.running), len(sched.waiting), sched.pool.usage


def _serve(engine: Any, conn: Any) -> None:
    """Rank 0's loop: the request loop over this rank's engine, with messages and updates on the pipe.

    A step's updates travel as one message, sent before the loop waits for or runs the next step: one pickle
    and one pipe write per step, not one per request. The engine's counts ride along (a server's /metrics)."""
    pending: list[tuple[int, Request]] = []

    def flush() -> None:
        if pending:
            conn.send(("updates", list(pending), engine_stats(engine)))
            pending.clear()

    def receive(block: bool) -> list[tuple]:
        flush()
        raw = [conn.recv()] if block else []
        while conn.poll():
            raw.append(conn.recv())
        msgs: list[tuple] = []
        for msg in raw:
            if msg[0] == "add":  # one message per call, so a caller's requests start in the same step
                msgs += [("add", cid, ids, params, text, stream) for cid, ids, params, text, stream in msg[1]]
            elif msg[0] == "shutdown":
                msgs.append(("stop",))
            else:
                msgs.append(msg)
        return msgs

    def publish(cid: int, req: Request) -> bool:
        pending.append((cid, _snapshot(req)))
        return True  # the user's process tells rank 0 itself when a caller leaves (an "abort" message)

    try:
        RequestLoop(EngineCore(engine), receive, publish).run()
    finally:
        with contextlib.suppress(OSError):  # the user's process may be gone; the loop's own error matters more
            flush()  # the last step's updates (the loop stopped after it, or failed in the next)


def _quiet_like_parent(level: int) -> None:
    """A spawned rank starts with default logging: give it the parent's level and, unless that is debug, silence
    the libraries below us as the parent did (their warnings would otherwise print once per rank)."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if level <= logging.DEBUG:
        return
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    for name in ("torch", "torch._dynamo", "torch._inductor", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def rank_main(ctx: Any, args_dump: dict[str, Any], conn: Any, log_level: int = logging.WARNING) -> None:
    """Body of every rank (runs in the spawned process)."""
    import torch.distributed as dist
    from ad_config import load_llm_args

    from .build import build_engine

    _quiet_like_parent(log_level)
    args = load_llm_args(**args_dump)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)  # steps travel as pickles over CPU
    pids: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(pids, os.getpid(), group=control)

    def wrap(runner: Any) -> Any:
        # A one-rank launch has nothing to broadcast: the engine calls the runner itself, so overlapped
        # scheduling keeps its `future` input.
        return _BroadcastRunner(runner, control) if ctx.world_size > 1 and ctx.rank == 0 else runner

    def stop_others() -> None:
        if ctx.world_size > 1:
            dist.broadcast_object_list([None], src=0, group=control)

    engine, _, factory, report = build_engine(args, ctx.rank, ctx.world_size, runner_wrapper=wrap)
    reports: list[Any] = [None] * ctx.world_size  # every rank's build report, for rank 0 to hand to the caller
    dist.all_gather_object(reports, report, group=control)
    if ctx.rank != 0:
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=control)
            if box[0] is None:
                return
            batch, num_prefill = box[0]
            engine.runner.forward(batch, num_prefill)
    conn.send(("ready", int(factory.vocab_size), pids, reports))
    try:
        _serve(engine, conn)
    except BaseException as e:
        with contextlib.suppress(Exception):  # the others may be gone or out of step; the launcher ends them
            stop_others()
        if isinstance(e, _StepFailed):
            raise e.error from None  # the rank's error is the step's own, not the wrapper's
        raise
    stop_others()
