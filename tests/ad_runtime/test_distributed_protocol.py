"""Rank 0's request loop over a real pipe with a fake model: late requests join running ones, aborts free them."""

import multiprocessing as mp
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from ad_runtime.rank_worker import _serve
from ad_runtime.executor.engine import Engine
from ad_runtime.executor.request import RequestStatus
from ad_runtime.executor.scheduler import Scheduler
from ad_runtime.kv_cache.page_pool import PagePool
from ad_runtime.sampling_params import SamplingParams

VOCAB = 50


class GatedRunner:
    """Predicts last token + 1, records how many sequences each step ran, and runs a step only when let through.

    The gate makes the tests independent of timing: messages sent while a step waits are all in the pipe
    when rank 0 next looks. `started` counts the steps that reached the gate, so a test can wait until rank 0
    is inside a step (and so no longer reading the pipe) before it sends.
    """

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.batch_sizes: list[int] = []
        self.gate = threading.Semaphore(1)  # the first step only
        self.started = threading.Semaphore(0)  # one release per step that reached the gate

    def wait_for_steps(self, n: int) -> None:
        for _ in range(n):
            assert self.started.acquire(timeout=10), "rank 0 did not start the step"

    def forward(self, batch: Any, num_prefill: int) -> torch.Tensor:
        self.started.release()
        assert self.gate.acquire(timeout=10), "the test never let this step through"
        self.batch_sizes.append(len(batch))
        logits = torch.zeros(len(batch), VOCAB)
        for i, s in enumerate(batch):
            logits[i, (s.token_ids[-1] + 1) % VOCAB] = 1.0
        return logits


@pytest.fixture
def rank0() -> Iterator[tuple[Any, Engine, GatedRunner]]:
    """(the user's end of the pipe, rank 0's engine, its runner); rank 0's loop runs on a thread."""
    _UNREAD.clear()
    runner = GatedRunner()
    pool = PagePool(64, 4)
    engine = Engine(runner, Scheduler(pool, 4, 64, False, 64), None, 64, [], vocab_size=VOCAB)
    user, child = mp.Pipe()
    loop = threading.Thread(target=_serve, args=(engine, child), daemon=True)
    loop.start()
    yield user, engine, runner
    runner.gate.release(1000)
    user.send(("shutdown",))
    loop.join(5)
    assert not loop.is_alive()


def _add(conn: Any, cid: int, prompt: list[int], max_tokens: int, stream: bool) -> None:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    conn.send(("add", [(cid, prompt, params, None, stream)]))


_UNREAD: dict[int, list[tuple[int, Any]]] = {}  # per pipe: updates of a step message not handed out yet


def _next(conn: Any) -> tuple[int, Any]:
    """The next (client id, snapshot); a step's updates arrive as one message."""
    unread = _UNREAD.setdefault(id(conn), [])
    if not unread:
        assert conn.poll(10), "rank 0 sent nothing"
        kind, updates, (running, waiting, kv_usage) = conn.recv()
        assert kind == "updates" and updates, (kind, updates)
        assert running >= 0 and waiting >= 0 and 0.0 <= kv_usage <= 1.0
        unread.extend(updates)
    return unread.pop(0)


def test_a_late_request_joins_the_running_one(rank0: tuple[Any, Engine, GatedRunner]) -> None:
    conn, _, runner = rank0
    _add(conn, 7, [1, 2, 3], 6, stream=True)
    assert _next(conn)[1].output_token_ids == [4]
    _add(conn, 8, [10], 3, stream=False)
    runner.gate.release(1000)
    updates: dict[int, list[Any]] = {7: [], 8: []}
    while not (updates[7] and updates[7][-1].is_finished and updates[8]):
        cid, snap = _next(conn)
        updates[cid].append(snap)
    # The stream gets every token; the other request only its end; the prompt stays on rank 0's side.
    assert [s.output_token_ids for s in updates[7]] == [[4, 5], [4, 5, 6], [4, 5, 6, 7], [4, 5, 6, 7, 8], [4, 5, 6, 7, 8, 9]]
    assert len(updates[8]) == 1 and updates[8][0].output_token_ids == [11, 12, 13]
    assert updates[8][0].prompt_token_ids == []
    assert 2 in runner.batch_sizes  # some step ran both


def test_abort_frees_the_request_and_stops_its_updates(rank0: tuple[Any, Engine, GatedRunner]) -> None:
    conn, engine, runner = rank0
    _add(conn, 1, [1, 2], 40, stream=True)
    _next(conn)
    # Rank 0 reads the pipe between steps: send the abort only once the second step waits at the gate, so
    # the abort and the next request are both read after that step, whatever the threads' timing.
    runner.wait_for_steps(2)
    conn.send(("abort", 1))
    _add(conn, 2, [5], 2, stream=False)
    runner.gate.release(1000)
    seen: list[int] = []
    while True:
        cid, snap = _next(conn)
        seen.append(cid)
        if cid == 2:
            break
    assert snap.output_token_ids == [6, 7]
    # Request 1 made its second token in the step that was waiting when the abort came, then no more.
    assert seen == [1, 2] and not _UNREAD[id(conn)] and not conn.poll(0.2)
    assert not engine.has_unfinished and engine.scheduler.pool.num_free_pages == 64


def test_a_rejected_request_answers_at_once(rank0: tuple[Any, Engine, GatedRunner]) -> None:
    conn, _, _ = rank0
    _add(conn, 3, list(range(1, 40)) * 2, 4, stream=False)
    cid, snap = _next(conn)
    assert cid == 3 and snap.status is RequestStatus.FAILED and "max_seq_len" in snap.error


