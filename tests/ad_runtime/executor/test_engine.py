"""Engine with a fake paged model: batching, chunking and preemption never change a request's tokens."""

import random

import pytest
import torch
from ad_runtime.executor.engine import Engine
from ad_runtime.executor.request import RequestStatus
from ad_runtime.executor.scheduler import Scheduler
from ad_runtime.kv_cache.page_pool import PagePool
from ad_runtime.sampling_params import SamplingParams

VOCAB = 97


class FakePagedRunner:
    """Stores tokens in a paged 'cache' and predicts from the whole history read back through pages."""

    def __init__(self, num_pages: int, page_size: int):
        self.device = torch.device("cpu")
        self.page_size = page_size
        self.cache = torch.full((num_pages, page_size), -1, dtype=torch.long)

    def forward(self, batch, num_prefill):
        logits = torch.full((len(batch), VOCAB), -10.0)
        for i, s in enumerate(batch):
            for j, t in enumerate(s.token_ids):
                pos = s.input_pos + j
                self.cache[s.pages[pos // self.page_size], pos % self.page_size] = t
            n = s.input_pos + len(s.token_ids)
            hist = [int(self.cache[s.pages[p // self.page_size], p % self.page_size]) for p in range(n)]
            assert -1 not in hist, "read a cache slot nobody wrote"
            logits[i, (sum(h * (k + 1) for k, h in enumerate(hist)) * 31 + n) % VOCAB] = 10.0
        return logits


def _engine(num_pages=64, page=4, bs=4, tokens=64, chunked=False, max_seq_len=256, eos=(0,)):
    pool = PagePool(num_pages, page)
    sched = Scheduler(pool, bs, tokens, chunked, num_pages)
    return Engine(FakePagedRunner(num_pages, page), sched, None, max_seq_len, list(eos))


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def _run(engine, prompts, params):
    reqs = [engine.add_request(p, params) for p in prompts]
    engine.run_until_done(reqs)
    return reqs


@pytest.mark.parametrize("chunked", [False, True])
def test_batched_with_preemption_equals_alone(chunked):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = _prompts(32)
    alone = [_run(_engine(), [p], params)[0].output_token_ids for p in prompts]
    eng = _engine(num_pages=12, page=4, bs=4, tokens=24 if chunked else 64, chunked=chunked)
    reqs = _run(eng, prompts, params)
    assert [r.output_token_ids for r in reqs] == alone
    assert all(r.status == RequestStatus.FINISHED and r.finish_reason == "length" for r in reqs)
    assert sum(r.num_preemptions for r in reqs) > 0, "the small pool should force preemption"
    assert eng.scheduler.pool.num_free_pages == 12 and not eng.scheduler.pool.seq_ids()


def test_eos_and_stop_token_ids_and_max_seq_len():
    eng = _engine(eos=())
    r = _run(eng, [[5, 6, 7]], SamplingParams(max_tokens=50, temperature=0.0))[0]
    first = r.output_token_ids[0]
    r2 = _run(_engine(eos=(first,)), [[5, 6, 7]], SamplingParams(max_tokens=50, temperature=0.0))[0]
    assert r2.output_token_ids == [] and r2.finish_reason == "stop"
    r3 = _run(_engine(eos=()), [[5, 6, 7]], SamplingParams(max_tokens=50, temperature=0.0, stop_token_ids=[first]))[0]
    assert r3.output_token_ids == [first] and r3.finish_reason == "stop"
    r4 = _run(_engine(eos=(), max_seq_len=10), [[5, 6, 7]], SamplingParams(max_tokens=50, temperature=0.0))[0]
    assert len(r4.output_token_ids) == 7 and r4.finish_reason == "length"


def test_too_long_request_fails_alone():
    eng = _engine(max_seq_len=16)
    bad = eng.add_request(list(range(1, 40)), SamplingParams(max_tokens=4))
    good = eng.add_request([1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
    eng.run_until_done([good])
    assert bad.status == RequestStatus.FAILED and "max_seq_len" in bad.error
    assert good.status == RequestStatus.FINISHED and len(good.output_token_ids) == 4


def test_token_ids_outside_vocab_fail_alone():
    eng = _engine()
    eng.vocab_size = VOCAB
    bad = eng.add_request([1, VOCAB + 5], SamplingParams(max_tokens=2))
    good = eng.add_request([1, 2], SamplingParams(max_tokens=2, temperature=0.0))
    eng.run_until_done([good])
    assert bad.status == RequestStatus.FAILED and "vocabulary" in bad.error
    assert good.status == RequestStatus.FINISHED
