"""LLM(engine_process=True): the engine runs in a process of its own, with the same greedy tokens and streams."""

import os

import psutil
import pytest
from ad_runtime import LLM, SamplingParams

pytestmark = pytest.mark.slow

# The bundled SmolLM2 cut to 2 layers (real weights for those), fp32: quick to build twice.
COMMON = dict(device="cpu", dtype="float32", model_kwargs={"num_hidden_layers": 2}, max_seq_len=96,
              max_batch_size=4, attn_page_size=16)
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "Once upon a time there was a"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def in_process_tokens() -> list[list[int]]:
    with LLM(**COMMON) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_engine_in_its_own_process_gives_the_same_tokens(in_process_tokens: list[list[int]]) -> None:
    llm = LLM(engine_process=True, **COMMON)
    try:
        pids = llm.backend.rank_pids
        assert llm.core is None and len(pids) == 1 and pids[0] != os.getpid() and psutil.pid_exists(pids[0])
        outs = llm.generate(PROMPTS, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == in_process_tokens
        assert all(o.finished and o.outputs[0].text for o in outs)
        # A stream gets one update per step (a step's updates cross the pipe as one message).
        steps = list(llm.generate_stream(PROMPTS[2], GREEDY))
        assert [len(s.outputs[0].token_ids) for s in steps] == list(range(1, GREEDY.max_tokens + 1))
        assert steps[-1].finished and steps[-1].outputs[0].token_ids == in_process_tokens[2]
    finally:
        llm.shutdown()
    assert not psutil.pid_exists(pids[0]) or psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE
