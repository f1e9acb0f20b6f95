"""The bundled model through LLM with overlapped scheduling forced on (CPU): the same greedy tokens as without."""

import pytest
from ad_runtime import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Hi", "Write a short poem about the sea and the wind.", "Count to ten.",
           "Name three colors.", "Why is the sky blue?"]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0)
# Four layers of the real model; a KV pool of 10 pages of 16 tokens forces preemption; chunks of 24 tokens.
COMMON = dict(device="cpu", max_seq_len=128, max_batch_size=4, attn_page_size=16, max_num_tokens=24,
              enable_chunked_prefill=True, kv_cache_config={"max_tokens": 160}, model_kwargs={"num_hidden_layers": 4})


def _run(overlap: bool) -> tuple[list, list, list, int, int]:
    with LLM(overlap_scheduler=overlap, **COMMON) as llm:
        assert llm.engine.overlap is overlap
        outs = llm.generate(PROMPTS, GREEDY)
        *_, last = llm.generate_stream(PROMPTS[0], GREEDY)
        pool = llm.engine.scheduler.pool
        return ([o.outputs[0].token_ids for o in outs], [o.outputs[0].finish_reason for o in outs],
                last.outputs[0].token_ids, sum(o.metrics.num_preemptions for o in outs),
                pool.num_free_pages - llm.engine.scheduler.num_pages)


def test_overlap_gives_the_same_greedy_tokens():
    sync, over = _run(False), _run(True)
    assert over[0] == sync[0] and over[1] == sync[1]
    assert over[2] == sync[2] == sync[0][0]  # the stream ends with the batched answer
    assert sync[3] > 0, "the small pool should force preemption"
    assert over[4] == sync[4] == 0  # every page back in the pool


def test_overlap_is_refused_with_several_ranks():
    from ad_config import ConfigError

    with pytest.raises(ConfigError, match="overlap_scheduler"):
        LLM(overlap_scheduler=True, world_size=2, device="cpu")
