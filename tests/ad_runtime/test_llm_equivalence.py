"""Acceptance on the CPU: the bundled SmolLM2 (fp32, torch backend) through LLM equals Hugging Face greedy decoding."""

import pytest
import torch
from ad_config import ConfigError
from ad_runtime import LLM, SamplingParams

pytestmark = pytest.mark.slow

# Different lengths on purpose: the batch mixes short and long prefills, then decodes of different depths.
PROMPTS = [
    "What is the capital of France?",
    "Hi",
    "Write a short poem about the sea, the wind and the sailors who cross it at night.",
    "List three prime numbers.",
    "Explain in two sentences why the sky is blue, as if I were a child of six years.",
    "Who wrote Hamlet?",
    "Translate 'good morning, how are you today?' into Spanish and French.",
    "Name a color.",
]
NEW_TOKENS = 64
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
COMMON = {"device": "cpu", "attn_backend": "torch", "compile_backend": "torch-simple", "max_seq_len": 256}


@pytest.fixture(scope="module")
def llm():
    """One engine for all tests of the default configuration (building one takes most of the time)."""
    with LLM(max_batch_size=8, **COMMON) as engine:
        yield engine


@pytest.fixture(scope="module")
def prompt_ids(llm):
    return [llm.encode(p, chat_template=True)[0] for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_tokens(llm, prompt_ids):
    """Hugging Face greedy `generate` of each prompt alone, cut before the first end token."""
    from ad_compiler.models.bundled import bundled_model_dir
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir(), torch_dtype=torch.float32).eval()
    eos = sorted(llm.engine.eos_token_ids)
    out = []
    with torch.inference_mode():
        for ids in prompt_ids:
            gen = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos[0],
            )[0, len(ids) :].tolist()
            cut = next((i for i, t in enumerate(gen) if t in eos), len(gen))
            out.append(gen[:cut])
    return out


@pytest.fixture(scope="module")
def batched(llm, prompt_ids):
    """All eight prompts sent together."""
    return llm.generate(prompt_ids, GREEDY)


def test_eight_prompts_together_equal_hf_generate(batched, hf_tokens):
    assert any(len(t) == NEW_TOKENS for t in hf_tokens), "at least one prompt must run the full 64 tokens"
    for i, (out, ref) in enumerate(zip(batched, hf_tokens)):
        assert out.error is None and out.finished
        assert out.outputs[0].token_ids == ref, f"prompt {i} ({PROMPTS[i]!r}) differs from Hugging Face"
        assert out.outputs[0].finish_reason == ("length" if len(ref) == NEW_TOKENS else "stop")
    assert "Paris" in batched[0].outputs[0].text


def test_pool_free_after_generate(llm, batched):
    pool = llm.engine.scheduler.pool
    assert pool.num_free_pages == pool.num_pages


def test_too_long_request_fails_alone(llm, prompt_ids, hf_tokens):
    too_long = [prompt_ids[1][0]] * (llm.args.max_seq_len + 10)
    outs = llm.generate([prompt_ids[0], too_long, prompt_ids[3]], SamplingParams(max_tokens=16, temperature=0.0))
    bad = outs[1]
    assert bad.finished and bad.outputs[0].finish_reason == "error" and bad.outputs[0].token_ids == []
    assert "max_seq_len" in bad.error and str(llm.args.max_seq_len + 10) in bad.error
    for out, ref in ((outs[0], hf_tokens[0]), (outs[2], hf_tokens[3])):
        assert out.error is None
        assert out.outputs[0].token_ids == ref[:16]


def test_streaming_grows_to_the_generated_text(llm, batched):
    texts, counts = [], []
    for out in llm.generate_stream(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0), chat_template=True):
        texts.append(out.outputs[0].text)
        counts.append(len(out.outputs[0].token_ids))
    assert len(texts) > 5, "a stream yields once per token"
    assert counts == sorted(counts) and counts[-1] <= 24
    for shorter, longer in zip(texts, texts[1:]):
        assert longer.startswith(shorter)
    whole = llm.generate(PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0), chat_template=True)[0]
    assert texts[-1] == whole.outputs[0].text
    assert whole.outputs[0].token_ids == batched[0].outputs[0].token_ids[:24]


def test_unknown_keyword_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown_kw"):
        LLM(unknown_kw=1)


def test_preemption_with_small_pool_keeps_tokens(prompt_ids, hf_tokens):
    """16 requests, 4 at a time, in a pool too small for four: newest ones are preempted and recomputed."""
    page = 16
    max_tokens = [32, 20, 8, 28]  # mixed lengths: each prompt twice with different budgets (kept short: CPU time)
    longest = max(len(p) for p in prompt_ids) + max(max_tokens)
    pool_tokens = -(-longest // page) * page + 2 * page  # one full request fits; four never do
    n = len(prompt_ids)
    reqs = [(i % n, max_tokens[(i + i // n) % 4]) for i in range(2 * n)]
    with LLM(max_batch_size=4, attn_page_size=page, kv_cache_config={"max_tokens": pool_tokens}, **COMMON) as small:
        pool = small.engine.scheduler.pool
        assert pool.num_pages * page < 4 * longest
        outs = small.generate([prompt_ids[p] for p, _ in reqs], [SamplingParams(max_tokens=m, temperature=0.0)
                                                                  for _, m in reqs])
        assert sum(o.metrics.num_preemptions for o in outs) > 0, "the pool should have forced preemptions"
        for k, ((p, m), out) in enumerate(zip(reqs, outs)):
            assert out.error is None and out.finished
            assert out.outputs[0].token_ids == hf_tokens[p][:m], f"request {k} (prompt {p}, max_tokens {m})"
        assert pool.num_free_pages == pool.num_pages
        assert not small.engine.has_unfinished


def test_chunked_prefill_and_context_manager(prompt_ids, hf_tokens):
    """Prompts split into 16-token chunks mixed with decodes give the same tokens; `with` shuts the engine."""
    picked = [0, 2, 4, 6]
    with LLM(max_batch_size=4, enable_chunked_prefill=True, max_num_tokens=16, **COMMON) as chunked:
        assert chunked.engine.scheduler.max_num_tokens == 16
        outs = chunked.generate([prompt_ids[i] for i in picked], SamplingParams(max_tokens=32, temperature=0.0))
        assert all(len(prompt_ids[i]) > 16 for i in picked), "every prompt must need several chunks"
        for i, out in zip(picked, outs):
            assert out.outputs[0].token_ids == hf_tokens[i][:32], f"prompt {i}"
        pool = chunked.engine.scheduler.pool
        assert pool.num_free_pages == pool.num_pages
    assert chunked._closed and chunked._backend.engine is None
