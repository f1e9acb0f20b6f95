"""LLM(world_size=2) on gloo CPU ranks: same greedy tokens as one rank, failing ranks raise, shutdown ends every rank."""

import multiprocessing as mp
import time

import psutil
import pytest
from ad_compiler.distributed.launch import DistributedError
from ad_runtime import LLM, SamplingParams

pytestmark = pytest.mark.slow

# The bundled SmolLM2 cut to 4 layers (real weights for those), fp32: small enough for 2 CPU ranks.
COMMON = dict(device="cpu", dtype="float32", model_kwargs={"num_hidden_layers": 4}, max_seq_len=96,
              max_batch_size=4, attn_page_size=16)
PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "Once upon a time there was a"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _rank_children() -> list[mp.process.BaseProcess]:
    # The launcher names its processes rank0..rankN-1; active_children() also reaps finished ones.
    return [p for p in mp.active_children() if p.name.startswith("rank")]


@pytest.fixture(scope="module")
def single_rank_tokens() -> list[list[int]]:
    with LLM(world_size=1, **COMMON) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def llm2():
    llm = LLM(world_size=2, **COMMON)
    yield llm
    llm.shutdown()


def test_greedy_tokens_equal_single_rank(llm2: LLM, single_rank_tokens: list[list[int]]) -> None:
    outs = llm2.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == single_rank_tokens
    assert all(len(t) == GREEDY.max_tokens for t in single_rank_tokens)
    assert all(o.finished and o.outputs[0].text for o in outs)


def test_stream_and_second_request_reuse_the_ranks(llm2: LLM, single_rank_tokens: list[list[int]]) -> None:
    steps = list(llm2.generate_stream(PROMPTS[2], GREEDY))
    assert steps[-1].finished and steps[-1].outputs[0].token_ids == single_rank_tokens[2]
    # Each update carries one more token than the one before: the stream really is incremental.
    assert [len(s.outputs[0].token_ids) for s in steps] == list(range(1, GREEDY.max_tokens + 1))
    # An abandoned stream must not leave its messages for the next request.
    abandoned = llm2.generate_stream(PROMPTS[0], GREEDY)
    next(abandoned), next(abandoned)
    abandoned.close()
    again = llm2.generate([PROMPTS[1]], GREEDY)
    assert again[0].outputs[0].token_ids == single_rank_tokens[1]


def test_shutdown_ends_every_rank(llm2: LLM) -> None:
    pids = llm2._backend.rank_pids
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    start = time.monotonic()
    llm2.shutdown()
    assert time.monotonic() - start < 30
    assert not any(psutil.pid_exists(p) for p in pids)
    assert _rank_children() == []


def test_failing_rank_raises_instead_of_hanging() -> None:
    # rowwise q_proj alone leaves q with half its input features: the executor's shape check fails on each rank.
    bad = {"detect_sharding": {"sharding_source": ["manual"], "manual_config": {"tp_plan": {"q_proj": "rowwise"}}}}
    start = time.monotonic()
    with pytest.raises(DistributedError, match="sharding_transform_executor"):
        LLM(world_size=2, transforms=bad, **COMMON)
    # Building 4 layers takes well under this even on a loaded CPU; a hang would sit in a collective forever.
    assert time.monotonic() - start < 300
    assert _rank_children() == []
