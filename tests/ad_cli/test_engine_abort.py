"""The server's engines abort a request whose client went away, and report failures of the server as internal."""

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from ad_cli import server_app
from ad_cli.distributed_engine import DistributedEngine
from ad_cli.engine_thread import EngineThread
from ad_runtime.build import ABORT_MESSAGE
from ad_runtime.executor.core import EngineCore
from ad_runtime.executor.engine import Engine
from ad_runtime.executor.scheduler import Scheduler
from ad_runtime.kv_cache.page_pool import PagePool
from ad_runtime.sampling_params import SamplingParams

LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)


class StepByStepRunner:
    """Always predicts token 3; each step waits until the test lets it through (no timing races)."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.allowed = threading.Semaphore(1)

    def forward(self, batch: Any, num_prefill: int) -> torch.Tensor:
        assert self.allowed.acquire(timeout=10)
        logits = torch.zeros(len(batch), 8)
        logits[:, 3] = 1.0
        return logits


def test_engine_thread_abort_ends_the_request_on_the_engine() -> None:
    runner = StepByStepRunner()
    engine = Engine(runner, Scheduler(PagePool(128, 4), 4, 64, False, 128), None, 256, [])
    aborted: list[tuple[Any, str]] = []
    abort = engine.abort
    engine.abort = lambda req, why: (aborted.append((req, why)), abort(req, why))  # type: ignore[method-assign]
    thread = EngineThread(SimpleNamespace(core=EngineCore(engine)))

    async def run() -> Any:
        q = thread.submit([1, 2], LONG, None)
        first = await q.get()
        thread.abort(q)
        runner.allowed.release(1000)
        return first

    try:
        assert asyncio.run(run()).token_ids == [3]
        deadline = time.monotonic() + 10
        while engine.has_unfinished and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.has_unfinished and engine.scheduler.pool.num_free_pages == 128
        # Aborted before the second step, or right after it if it was already waiting: far from its 200 tokens.
        [(req, why)] = aborted
        assert why == ABORT_MESSAGE and len(req.output_token_ids) in (1, 2)
    finally:
        runner.allowed.release(1000)
        thread.close()


def test_engine_thread_survives_a_caller_whose_event_loop_closed() -> None:
    """Updates for a caller whose loop is gone are dropped and its request aborted; the thread serves on."""
    runner = StepByStepRunner()
    runner.allowed = threading.Semaphore(0)  # hold the first step until the caller's loop has closed
    engine = Engine(runner, Scheduler(PagePool(128, 4), 4, 64, False, 128), None, 256, [])
    thread = EngineThread(SimpleNamespace(core=EngineCore(engine)))

    async def submit_and_leave() -> None:
        thread.submit([1, 2], LONG, None)

    try:
        asyncio.run(submit_and_leave())
        runner.allowed.release(1000)
        deadline = time.monotonic() + 10
        while engine.has_unfinished and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.has_unfinished and engine.scheduler.pool.num_free_pages == 128
        assert thread._thread.is_alive()

        async def second() -> Any:
            q = thread.submit([1, 2], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), None, False)
            return await asyncio.wait_for(q.get(), 10)

        last = asyncio.run(second())
        assert last.finished and last.token_ids == [3, 3, 3]
    finally:
        runner.allowed.release(1000)
        thread.close()


class FakeBackend:
    """DistributedBackend's request API, recorded."""

    def __init__(self) -> None:
        self.detok = SimpleNamespace(stream_text=lambda req: " ".join(map(str, req.output_token_ids)))
        self.callbacks: dict[int, Any] = {}
        self.aborted: list[int] = []

    def submit(self, prompts: list, params: list, texts: list, stream: bool, on_update: Any) -> list[int]:
        cid = len(self.callbacks)
        self.callbacks[cid] = on_update
        return [cid]

    def abort(self, cid: int) -> None:
        self.aborted.append(cid)


def test_distributed_engine_aborts_on_rank_0_and_reports_dead_ranks_as_internal() -> None:
    backend = FakeBackend()
    engine = DistributedEngine(backend)

    async def run() -> Any:
        gone, failing = engine.submit([1], LONG, None), engine.submit([2], LONG, None)
        engine.abort(gone)
        engine.abort(gone)  # twice: still one abort on rank 0
        # The backend calls back on its reader thread.
        threading.Thread(target=backend.callbacks[1], args=(1, RuntimeError("rank 1 died"))).start()
        return await failing.get()

    upd = asyncio.run(run())
    assert backend.aborted == [0]
    assert upd.finished and upd.internal and "rank 1 died" in upd.error


def test_a_non_streaming_request_is_aborted_when_its_client_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_app, "DISCONNECT_POLL_S", 0.01)
    aborted: list[Any] = []

    class Gone:
        async def is_disconnected(self) -> bool:
            return True

    async def run() -> Any:
        q: asyncio.Queue = asyncio.Queue()
        out = await server_app._last_update(q, SimpleNamespace(abort=aborted.append), Gone())
        return out, q

    out, q = asyncio.run(run())
    assert out is None and aborted == [q]


def test_engine_thread_counts_a_request_as_waiting_until_the_scheduler_has_it() -> None:
    # The server refuses requests by num_waiting; a request the engine thread has taken from its inbox but not yet
    # handed to the scheduler must still count (missing it let a request past --max-queued-requests).
    engine = Engine(StepByStepRunner(), Scheduler(PagePool(128, 4), 4, 64, False, 128), None, 256, [])
    core = EngineCore(engine)
    seen: list[int] = []
    submit = core.submit

    def watched_submit(*args: Any, **kwargs: Any) -> Any:
        seen.append(thread.num_waiting)  # the request is neither in the scheduler nor in the inbox here
        return submit(*args, **kwargs)

    core.submit = watched_submit  # type: ignore[method-assign]
    thread = EngineThread(SimpleNamespace(core=core))

    async def run() -> Any:
        return await thread.submit([1, 2], SamplingParams(max_tokens=1, temperature=0.0), None, stream=False).get()

    try:
        assert asyncio.run(run()).token_ids == [3]
        assert seen == [1] and thread.num_waiting == 0
    finally:
        thread.close()
