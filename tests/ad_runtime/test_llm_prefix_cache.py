"""Prefix caching through LLM on the bundled model (CPU): same greedy tokens as without it, far fewer prompt tokens
computed, a pool that returns to full, eviction under a small pool; a hybrid Mamba2 model runs without reuse."""

import logging
import random

import pytest
import torch
from ad_runtime import LLM, SamplingParams
from transformers import BambaConfig, BambaForCausalLM

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    # Two layers: these tests compare runs of the same model with each other. 16 pages of 64 tokens: the 32
    # requests below fit 8 at a time only when they share their prefix pages.
    with LLM(device="cpu", max_seq_len=448, max_batch_size=8, model_kwargs={"num_hidden_layers": 2},
             skip_tokenizer_init=True, kv_cache_config={"max_tokens": 1024}) as engine:
        assert engine.engine.scheduler.prefix_caching, "prefix caching is on by default"
        yield engine


def _prompts(n: int, prefix_len: int, num_prefixes: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(100, 40000) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    return [rng.choice(prefixes) + [rng.randrange(100, 40000) for _ in range(rng.randrange(3, 12))] for _ in range(n)]


def _generate(llm: LLM, prompts: list[list[int]], caching: bool) -> tuple[list[list[int]], int]:
    """Greedy tokens and prompt tokens computed, with prefix caching on or off (switched on the running engine, which
    saves a second build; test_the_flag_reaches_the_scheduler shows that enable_prefix_caching sets the same switch)."""
    engine = llm.engine
    engine.scheduler.prefix_caching = caching
    try:
        before = engine.num_prompt_tokens_computed
        outs = llm.generate(prompts, GREEDY)
        computed = engine.num_prompt_tokens_computed - before
    finally:
        engine.scheduler.prefix_caching = True
    pool = engine.scheduler.pool
    assert pool.num_free_pages == engine.scheduler.num_pages and not pool.seq_ids(), "pages leaked"
    assert all(pool.cache.refcount(p) == 0 for p in range(pool.num_pages))
    return [o.outputs[0].token_ids for o in outs], computed


def test_32_requests_sharing_a_400_token_prefix(llm: LLM) -> None:
    prompts = _prompts(32, 400, 1, seed=0)
    ref, computed_off = _generate(llm, prompts, caching=False)
    stats = llm.engine.prefix_cache_stats
    hits0 = stats.hit_tokens
    tokens, computed_on = _generate(llm, prompts, caching=True)
    assert tokens == ref
    assert computed_off == sum(map(len, prompts))
    assert computed_on <= 0.2 * computed_off, f"{computed_on} of {computed_off} prompt tokens computed"
    assert stats.hit_tokens - hits0 == computed_off - computed_on
    assert 0.8 < stats.hit_rate < 1.0


def test_eviction_under_a_small_pool_never_corrupts_outputs(llm: LLM) -> None:
    # Six prefixes of two pages and 16 pages in all: cached prefixes are evicted to make room, others are hit.
    prompts = _prompts(12, 128, 6, seed=1)
    ref, _ = _generate(llm, prompts, caching=False)
    cache = llm.engine.scheduler.pool.cache
    evicted0, hits0 = cache.num_evictions, llm.engine.prefix_cache_stats.hit_tokens
    tokens, _ = _generate(llm, prompts, caching=True)
    assert tokens == ref
    assert cache.num_evictions > evicted0 and llm.engine.prefix_cache_stats.hit_tokens > hits0


BAMBA = dict(vocab_size=48, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2,
             mamba_d_state=6, mamba_expand=1, mamba_chunk_size=8, mamba_d_conv=4, tie_word_embeddings=False)


def test_hybrid_mamba2_model_gives_the_same_tokens_without_reuse_and_says_so_once(tmp_path, caplog) -> None:
    """Prefix caching on (the default) for a Bamba model: reuse is off for it, one log line says so, and its tokens
    are those of the model's definition (recomputed without any cache), run after run."""
    torch.manual_seed(0)
    model = BambaForCausalLM(BambaConfig(**BAMBA)).eval()
    model.save_pretrained(tmp_path)
    prefix = [3, 17, 29, 8, 41, 12, 7, 30, 22, 9, 14, 2, 33, 19, 25, 6, 11, 38]  # two pages of 8 and two tokens
    prompts = [prefix + [5], prefix + [21, 13, 8], prefix, prefix + [40, 1]]
    refs = []
    with torch.inference_mode():
        for p in prompts:
            seq = list(p)
            for _ in range(4):
                seq.append(int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax()))
            refs.append(seq[len(p):])
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with caplog.at_level(logging.INFO, logger="ad_runtime.executor.scheduler"):
        with LLM(str(tmp_path), device="cpu", dtype="float32", skip_tokenizer_init=True, attn_backend="torch",
                 compile_backend="torch-simple", max_seq_len=64, attn_page_size=8, max_batch_size=2) as llm:
            assert llm.engine.runner.cm.state_specs, "the graph keeps no Mamba state"
            # Twice: the second run would find the first one's pages if reuse were on.
            runs = [[o.outputs[0].token_ids for o in llm.generate(prompts, params)] for _ in range(2)]
            assert not llm.engine.scheduler.prefix_caching and llm.engine.prefix_cache_stats.hit_tokens == 0
    said = [r for r in caplog.records if "prefix caching is off" in r.getMessage()]
    assert len(said) == 1
    assert runs[0] == runs[1] == refs


class _Factory:
    vocab_size = 32
    generation_config = config = None

    def init_tokenizer(self) -> None:
        return None


@pytest.mark.parametrize("flag, has_state, expected", [(True, False, True), (False, False, False), (True, True, False)])
def test_the_flag_reaches_the_scheduler(monkeypatch, flag, has_state, expected) -> None:
    """enable_prefix_caching as LLM(...) and ad-serve pass it (LlmArgs -> build_engine), on a stand-in graph."""
    from ad_config import load_llm_args
    from ad_runtime import build
    from ad_runtime.kv_cache import CachedSequenceInterface, StateSpec

    cm = CachedSequenceInterface(max_batch_size=2, max_seq_len=16, page_size=4)
    if has_state:
        cm.add_state("ssm_state", StateSpec((2,), torch.float32))
    monkeypatch.setattr(build, "build_graph",
                        lambda args, rank, world_size: (torch.nn.Identity(), cm, _Factory(), None))
    args = load_llm_args(device="cpu", enable_prefix_caching=flag)
    engine, _, _, _ = build.build_engine(args)
    assert engine.scheduler.prefix_caching is expected
