"""world_size > 1: one process per rank; rank 0 schedules and broadcasts each step, the user's process talks to rank 0.

    user process --pipe--> rank 0 (tokenizer, scheduler, sampling) --broadcast step--> ranks 1..N-1
    every rank runs the same sharded graph on the same flattened batch; collectives live in the graph.
"""

import datetime
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .executor.engine import StepSequence
from .executor.request import Request, RequestStatus
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Ranks 1..N-1 wait on the control group for rank 0's next step for as long as the user stays idle; a dead
# peer is caught by the launcher watching the processes, not by this timeout.
CONTROL_TIMEOUT = datetime.timedelta(days=365)
# How long shutdown() lets the ranks end by themselves before killing them.
SHUTDOWN_GRACE_S = 20.0


class _BroadcastRunner:
    """Rank 0's runner: sends each step to the other ranks before running it itself."""

    def __init__(self, runner: Any, group: Any):
        self.runner, self.group, self.device = runner, group, runner.device

    def forward(self, batch: Sequence[StepSequence], num_prefill: int) -> torch.Tensor:
        import torch.distributed as dist

        dist.broadcast_object_list([(list(batch), num_prefill)], src=0, group=self.group)
        return self.runner.forward(batch, num_prefill)

    def stop_others(self) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([None], src=0, group=self.group)


def _worker(ctx: Any, args_dump: dict[str, Any], conn: Any) -> None:
    """Body of every rank (runs in the spawned process)."""
    import torch.distributed as dist
    from ad_config import load_llm_args

    from .build import build_engine

    args = load_llm_args(**args_dump)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)  # steps travel as pickles over CPU
    pids: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(pids, os.getpid(), group=control)
    holder: dict[str, Any] = {}

    def wrap(runner: Any) -> Any:
        if ctx.rank == 0:
            holder["runner"] = _BroadcastRunner(runner, control)
            return holder["runner"]
        holder["runner"] = runner
        return runner

    engine, _, factory = build_engine(args, ctx.rank, ctx.world_size, runner_wrapper=wrap)
    if ctx.rank != 0:
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=control)
            if box[0] is None:
                return
            batch, num_prefill = box[0]
            holder["runner"].forward(batch, num_prefill)
    conn.send(("ready", int(factory.vocab_size), pids))
    try:
        while True:
            msg = conn.recv()
            if msg[0] == "shutdown":
                return
            _, prompts, params, texts, stream = msg
            reqs = [engine.add_request(p, sp, t) for p, sp, t in zip(prompts, params, texts)]
            while any(r.status in (RequestStatus.WAITING, RequestStatus.RUNNING) for r in reqs):
                changed = engine.step()
                if stream:
                    for r in changed:
                        if not r.is_finished and not r.params.stop:
                            r.text = engine.detok.decode(r.output_token_ids, r.params.skip_special_tokens)
                        conn.send(("update", r))
            conn.send(("done", reqs))
    finally:
        holder["runner"].stop_others()


class DistributedBackend:
    """Starts the ranks in the background and forwards requests to rank 0."""

    def __init__(self, args: Any):
        from ad_compiler.distributed.launch import launch
        from ad_compiler.export.pipeline import factory_from_args

        self.world_size = args.world_size
        self.engine = None  # lives in rank 0's process
        self.rank_pids: list[int] = []
        # Before any rank starts: a failure here must not leave ranks behind.
        self.tokenizer = factory_from_args(args, device="cpu").init_tokenizer()
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()  # one conversation with rank 0 at a time
        self._error: BaseException | None = None
        dump = args.model_dump(mode="json", exclude={"yaml_default", "yaml_extra"})

        def run() -> None:
            try:
                launch(_worker, args.world_size, args=(dump, child), timeout_s=10**9)
            except BaseException as e:  # noqa: BLE001 - surfaced to the caller on its next request
                self._error = e

        self._thread = threading.Thread(target=run, name="ad-ranks", daemon=True)
        self._thread.start()
        kind, self.vocab_size, self.rank_pids = self._recv()
        assert kind == "ready"

    def _recv(self) -> Any:
        from ad_compiler.distributed.launch import DistributedError

        while not self._conn.poll(0.1):
            if not self._thread.is_alive() or self._error is not None:
                self._thread.join(5.0)  # the launcher stops the other ranks before it returns
                if isinstance(self._error, DistributedError):
                    raise self._error
                raise DistributedError(f"the ranks stopped: {self._error or 'rank 0 ended'}") from self._error
        return self._conn.recv()

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], texts: list[str | None]) -> list[Request]:
        with self._lock:
            self._conn.send(("generate", prompts, params, texts, False))
            kind, reqs = self._recv()
        return reqs

    def stream(self, prompt: list[int], params: SamplingParams, text: str | None) -> Iterator[Request]:
        with self._lock:
            self._conn.send(("generate", [prompt], [params], [text], True))
            done = False
            try:
                while not done:
                    kind, payload = self._recv()
                    done = kind == "done"
                    if done:
                        yield payload[0]
                    elif not payload.is_finished:
                        yield payload
            finally:
                # A caller that stops listening early: read the rest, or the next request would get it.
                while not done and self._thread.is_alive():
                    done = self._recv()[0] == "done"

    def shutdown(self) -> None:
        """Ask rank 0 to stop (it stops the others); kill whatever is still running after a grace period."""
        if not self._thread.is_alive():
            return
        try:
            self._conn.send(("shutdown",))
        except (BrokenPipeError, OSError):
            pass
        self._thread.join(SHUTDOWN_GRACE_S)
        if self._thread.is_alive():
            logger.warning("ranks did not stop within %.0fs; killing them", SHUTDOWN_GRACE_S)
            for pid in self.rank_pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            # The launcher notices the dead ranks, stops the rest and returns.
            deadline = time.monotonic() + 10.0
            while self._thread.is_alive() and time.monotonic() < deadline:
                self._thread.join(0.5)
