"""Prefix caching in the engine, with a fake paged model: same tokens as without it, fewer prompt tokens computed,
refcounts right through preemption, aborts and eviction, and never a write into a shared page."""

import logging
import random

import pytest
import torch
from ad_runtime.executor.engine import Engine
from ad_runtime.executor.request import RequestStatus
from ad_runtime.executor.scheduler import Scheduler
from ad_runtime.kv_cache.page_pool import PagePool
from ad_runtime.sampling_params import SamplingParams

VOCAB = 97
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


class GuardedPagedRunner:
    """A paged fake model: stores tokens in its pages and predicts from the whole history read back through them.

    It fails a step that writes into a page another sequence holds or that the cache keys (a shared page must
    never change), and resolves overlap placeholders -(row + 1) like GraphRunner.
    """

    def __init__(self, pool: PagePool):
        self.device = torch.device("cpu")
        self.pool = pool
        self.cache = torch.full((pool.num_pages, pool.page_size), -1, dtype=torch.long)

    def forward(self, batch, num_prefill, future=None):
        ps, refs = self.pool.page_size, self.pool.cache
        logits = torch.full((len(batch), VOCAB), -10.0)
        for i, s in enumerate(batch):
            for j, t in enumerate(s.token_ids):
                t = int(future[-t - 1]) if t < 0 else t
                pos = s.input_pos + j
                page = s.pages[pos // ps]
                assert refs.refcount(page) == 1 and page not in refs._key_of, f"write into shared page {page}"
                self.cache[page, pos % ps] = t
            n = s.input_pos + len(s.token_ids)
            hist = [int(self.cache[s.pages[p // ps], p % ps]) for p in range(n)]
            assert -1 not in hist, "read a cache slot nobody wrote"
            h = sum(x * (k + 1) for k, x in enumerate(hist)) * 31 + n
            logits[i] = torch.sin(torch.arange(VOCAB) * 0.37 + h)  # argmax depends on the whole history
        return logits


def _engine(caching=True, num_pages=64, page=4, bs=4, tokens=64, chunked=False, overlap=False, has_state=False):
    pool = PagePool(num_pages, page)
    sched = Scheduler(pool, bs, tokens, chunked, num_pages, enable_prefix_caching=caching, has_state=has_state)
    return Engine(GuardedPagedRunner(pool), sched, None, 256, [], overlap=overlap)


def _shared_prefix_prompts(n, prefix_len, seed=0, num_prefixes=1):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    return [prefixes[rng.randrange(num_prefixes)] + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 9))]
            for _ in range(n)]


def _run(eng, prompts, params=GREEDY, max_steps=2000):
    reqs = [eng.add_request(p, params) for p in prompts]
    _until_done(eng, reqs, max_steps)
    return reqs


def _until_done(eng, reqs, max_steps=2000):
    # Bounded, so that broken bookkeeping (a request that can never be admitted) fails instead of hanging.
    for _ in range(max_steps):
        if all(r.is_finished for r in reqs):
            return
        eng.step()
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def _assert_clean(eng):
    pool = eng.scheduler.pool
    assert not eng.has_unfinished
    assert pool.num_free_pages == eng.scheduler.num_pages and not pool.seq_ids()
    assert all(pool.cache.refcount(p) == 0 for p in range(pool.num_pages))
    assert sorted(eng.scheduler._free_slots) == list(range(eng.scheduler.max_batch_size))


@pytest.mark.parametrize("chunked, overlap", [(False, False), (True, False), (False, True), (True, True)])
def test_shared_prefix_gives_the_same_tokens_and_skips_most_prompt_tokens(chunked, overlap):
    prompts = _shared_prefix_prompts(16, 40)
    kw = dict(bs=4, tokens=24 if chunked else 64, chunked=chunked, overlap=overlap)
    off = _engine(caching=False, **kw)
    ref = _run(off, prompts)
    eng = _engine(**kw)
    reqs = _run(eng, prompts)
    assert [r.output_token_ids for r in reqs] == [r.output_token_ids for r in ref]
    assert off.num_prompt_tokens_computed == sum(map(len, prompts))
    # Only the first request computes the 40-token prefix (its followers wait for it, then take its pages).
    assert [r.num_cached_tokens for r in reqs] == [0] + [40] * 15
    assert eng.num_prompt_tokens_computed == sum(len(p) - r.num_cached_tokens for p, r in zip(prompts, reqs))
    assert eng.num_prompt_tokens_computed <= 0.25 * off.num_prompt_tokens_computed
    stats = eng.prefix_cache_stats
    assert (stats.queried_tokens, stats.hit_tokens) == (sum(map(len, prompts)), 15 * 40)
    _assert_clean(eng)


def test_a_fully_cached_prompt_still_computes_its_last_token_in_a_page_of_its_own():
    eng = _engine()
    whole_pages, one_more = list(range(1, 13)), list(range(1, 14))  # 3 pages of 4; 3 pages and one token
    first = _run(eng, [whole_pages])[0]
    again = _run(eng, [whole_pages])[0]
    # All three pages are cached, but the last token must be computed: the last page is recomputed, privately.
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 8)
    longer = _run(eng, [one_more])[0]
    assert longer.num_cached_tokens == 12  # one token left: it runs as a one-token row
    assert eng.num_prompt_tokens_computed == 12 + 4 + 1
    assert again.output_token_ids == first.output_token_ids
    assert longer.output_token_ids == _run(_engine(caching=False), [one_more])[0].output_token_ids
    _assert_clean(eng)


def test_a_request_that_ends_in_the_step_that_filled_its_pages_leaves_them_cached():
    eng = _engine()
    prompt = list(range(1, 14))
    first = _run(eng, [prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))[0]
    again = _run(eng, [prompt])[0]
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 12)
    assert again.output_token_ids[:1] == first.output_token_ids
    _assert_clean(eng)


@pytest.mark.parametrize("chunked", [False, True])
def test_preemption_keeps_refcounts_right_and_tokens_unchanged(chunked):
    prompts = _shared_prefix_prompts(12, 12, seed=1)
    long = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
    kw = dict(num_pages=14, bs=4, tokens=16 if chunked else 64, chunked=chunked)
    ref = _run(_engine(caching=False, **kw), prompts, long)
    eng = _engine(**kw)
    reqs = _run(eng, prompts, long)
    assert [r.output_token_ids for r in reqs] == [r.output_token_ids for r in ref]
    assert sum(r.num_preemptions for r in reqs) > 0, "the small pool should force preemption"
    assert eng.prefix_cache_stats.hit_tokens > 0
    _assert_clean(eng)


def test_aborting_requests_that_share_pages_leaves_the_others_theirs():
    prefix = list(range(1, 17))
    prompts = [prefix + list(range(20, 27)), prefix + list(range(30, 35)), prefix + list(range(40, 52))]
    long = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    alone = _run(_engine(caching=False), prompts[1:2], long)[0].output_token_ids
    eng = _engine(tokens=8, chunked=True)
    pool = eng.scheduler.pool
    reqs = [eng.add_request(p, long) for p in prompts]
    # The first computes the prefix in 8-token chunks while the others wait, then they take its pages.
    for _ in range(4):
        eng.step()
    assert reqs[0].output_token_ids and reqs[2].num_computed_tokens < len(prompts[2])  # decoding; mid-prefill
    shared = pool.page_table(reqs[0].request_id)[:4]
    assert all(pool.page_table(r.request_id)[:4] == shared for r in reqs)
    assert [pool.cache.refcount(p) for p in shared] == [3] * 4
    eng.abort(reqs[0], "caller left")
    assert [pool.cache.refcount(p) for p in shared] == [2] * 4
    eng.abort(reqs[2], "caller left")
    assert [pool.cache.refcount(p) for p in shared] == [1] * 4
    _until_done(eng, reqs[1:2])
    assert reqs[0].status == reqs[2].status == RequestStatus.FAILED
    assert reqs[1].output_token_ids == alone
    _assert_clean(eng)
    assert pool.match(reqs[1].page_keys[:4]) == shared  # still cached for the next request


def test_eviction_under_a_tiny_pool_never_changes_tokens():
    # Requests pick one of six prefixes of 3 pages at random; a pool of 12 pages cannot keep them all cached.
    prompts = _shared_prefix_prompts(30, 12, seed=3, num_prefixes=6)
    kw = dict(num_pages=12, bs=2)
    ref = _run(_engine(caching=False, **kw), prompts)
    eng = _engine(**kw)
    reqs = _run(eng, prompts)
    assert [r.output_token_ids for r in reqs] == [r.output_token_ids for r in ref]
    assert eng.scheduler.pool.cache.num_evictions > 0
    assert eng.prefix_cache_stats.hit_tokens > 0
    _assert_clean(eng)


def test_without_prefix_caching_no_page_is_ever_shared():
    eng = _engine(caching=False)
    reqs = _run(eng, _shared_prefix_prompts(8, 20))
    assert all(r.num_cached_tokens == 0 for r in reqs) and eng.prefix_cache_stats.queried_tokens == 0
    assert eng.scheduler.pool.cache.num_cached == 0
    _assert_clean(eng)


def test_a_model_with_recurrent_state_runs_without_reuse_and_says_so_once(caplog):
    prompts = _shared_prefix_prompts(6, 20, seed=4)
    with caplog.at_level(logging.INFO, logger="ad_runtime.executor.scheduler"):
        eng = _engine(has_state=True)
        reqs = _run(eng, prompts)
        _engine(caching=False, has_state=True)  # switched off: nothing to say
    said = [r for r in caplog.records if "prefix caching is off" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert not eng.scheduler.prefix_caching and all(r.num_cached_tokens == 0 for r in reqs)
    assert eng.num_prompt_tokens_computed == sum(map(len, prompts))
    _assert_clean(eng)
