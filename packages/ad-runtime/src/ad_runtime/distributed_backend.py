"""world_size > 1: one process per rank; rank 0 schedules and broadcasts each step, the user's process talks to rank 0.

    user process --pipe--> rank 0 (tokenizer, scheduler, sampling) --broadcast step--> ranks 1..N-1
    every rank runs the same sharded graph on the same flattened batch; collectives live in the graph.
"""

import logging
import multiprocessing as mp
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .executor.engine import StepSequence
from .executor.request import Request, RequestStatus
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


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
    control = dist.new_group(backend="gloo")  # step descriptions travel as pickles over CPU
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
    conn.send(("ready", int(factory.vocab_size)))
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
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._error: BaseException | None = None
        dump = args.model_dump(mode="json", exclude={"yaml_default", "yaml_extra"})

        def run() -> None:
            try:
                launch(_worker, args.world_size, args=(dump, child), timeout_s=10**9)
            except BaseException as e:  # noqa: BLE001 - surfaced to the caller on its next request
                self._error = e

        self._thread = threading.Thread(target=run, name="ad-ranks", daemon=True)
        self._thread.start()
        self.engine = None  # lives in rank 0's process
        factory = factory_from_args(args, device="cpu")
        self.tokenizer = factory.init_tokenizer()
        kind, self.vocab_size = self._recv()
        assert kind == "ready"

    def _recv(self) -> Any:
        while not self._conn.poll(0.1):
            if not self._thread.is_alive() or self._error is not None:
                raise RuntimeError(f"a rank failed: {self._error}") from self._error
        return self._conn.recv()

    def generate(self, prompts: list[list[int]], params: list[SamplingParams], texts: list[str | None]) -> list[Request]:
        self._conn.send(("generate", prompts, params, texts, False))
        kind, reqs = self._recv()
        return reqs

    def stream(self, prompt: list[int], params: SamplingParams, text: str | None) -> Iterator[Request]:
        self._conn.send(("generate", [prompt], [params], [text], True))
        while True:
            kind, payload = self._recv()
            if kind == "done":
                yield payload[0]
                return
            if not payload.is_finished:
                yield payload

    def shutdown(self) -> None:
        if self._thread.is_alive():
            try:
                self._conn.send(("shutdown",))
            except (BrokenPipeError, OSError):
                pass
            self._thread.join(timeout=30)
