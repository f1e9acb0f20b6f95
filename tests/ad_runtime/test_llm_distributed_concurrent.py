"""LLM(world_size=2) called from several threads: rank 0 batches their requests together, tokens stay those of one rank."""

import os
import signal
import threading
import time
from typing import Any

import pytest
from ad_compiler.distributed.launch import DistributedError
from ad_runtime import LLM, RequestOutput, SamplingParams

pytestmark = pytest.mark.slow

# The bundled SmolLM2 cut to 2 layers (real weights for those), fp32: quick to build on 2 CPU ranks.
COMMON = dict(device="cpu", dtype="float32", model_kwargs={"num_hidden_layers": 2}, max_seq_len=96,
              max_batch_size=4, attn_page_size=16)
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "Once upon a time there was a"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def single_rank_tokens() -> list[list[int]]:
    with LLM(world_size=1, **COMMON) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def llm2():
    llm = LLM(world_size=2, **COMMON)
    yield llm
    llm.shutdown()


def _shared_a_step(a: RequestOutput, b: RequestOutput) -> bool:
    """Whether rank 0 sampled both requests in one step.

    Rank 0 stamps each step's new tokens with one clock reading (first_token_time) and finishes requests
    before the next step starts; a running request is in every step from its first token to its last (no
    preemption here). So the two [first token, finish] intervals overlap exactly when some step held both.
    """
    ma, mb = a.metrics, b.metrics
    assert ma.num_preemptions == mb.num_preemptions == 0
    return max(ma.first_token_time, mb.first_token_time) <= min(ma.finish_time, mb.finish_time)


def _in_thread(fn: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def test_two_threads_share_steps_and_match_one_rank(llm2: LLM, single_rank_tokens: list[list[int]]) -> None:
    barrier = threading.Barrier(2)

    def ask(i: int) -> RequestOutput:
        barrier.wait()
        return llm2.generate([PROMPTS[i]], GREEDY)[0]

    (ta, a), (tb, b) = _in_thread(ask, 0), _in_thread(ask, 1)
    ta.join(120), tb.join(120)
    a, b = a["value"], b["value"]
    assert a.outputs[0].token_ids == single_rank_tokens[0]
    assert b.outputs[0].token_ids == single_rank_tokens[1]
    assert _shared_a_step(a, b)


def test_a_request_joins_a_running_stream(llm2: LLM, single_rank_tokens: list[list[int]]) -> None:
    stream = llm2.generate_stream(PROMPTS[2], GREEDY)
    steps = [next(stream)]
    # Sent while the stream has 9 tokens to go: rank 0 must take it into the running batch.
    t, box = _in_thread(llm2.generate, [PROMPTS[3]], GREEDY)
    steps += list(stream)
    t.join(120)
    joined = box["value"][0]
    assert steps[-1].finished and steps[-1].outputs[0].token_ids == single_rank_tokens[2]
    assert [len(s.outputs[0].token_ids) for s in steps] == list(range(1, GREEDY.max_tokens + 1))
    assert joined.outputs[0].token_ids == single_rank_tokens[3]
    assert _shared_a_step(steps[-1], joined)


def test_a_dead_rank_fails_every_waiting_caller(llm2: LLM) -> None:
    # Runs last: it kills the module's ranks.
    long = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    stream = llm2.generate_stream(PROMPTS[0], long)
    next(stream)
    t, box = _in_thread(llm2.generate, [PROMPTS[1]], long)
    pids = llm2._backend.rank_pids
    start = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(DistributedError, match="rank"):
        for _ in stream:
            pass
    t.join(60)
    assert isinstance(box.get("error"), DistributedError)
    assert time.monotonic() - start < 60
    with pytest.raises(DistributedError):  # a new caller learns at once
        llm2.generate([PROMPTS[2]], GREEDY)
    llm2.shutdown()
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of the launcher may linger as a zombie until reaped; that is not a running rank.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
