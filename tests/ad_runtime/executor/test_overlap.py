"""Overlapped scheduling: the same tokens as the synchronous engine, under batching, chunking, preemption, stops, aborts."""

import random

import pytest
import torch
from ad_runtime.executor.engine import Engine
from ad_runtime.executor.request import RequestStatus
from ad_runtime.executor.scheduler import Scheduler
from ad_runtime.kv_cache.page_pool import PagePool
from ad_runtime.sampling_params import SamplingParams

VOCAB = 97


class FuturePagedRunner:
    """A paged fake model that, like GraphRunner, resolves placeholders -(row + 1) from the previous step's tokens."""

    def __init__(self, num_pages: int, page_size: int):
        self.device = torch.device("cpu")
        self.page_size = page_size
        self.cache = torch.full((num_pages, page_size), -1, dtype=torch.long)
        self.placeholders = 0  # how many inputs came from the device (proves overlap really ran)

    def forward(self, batch, num_prefill, future=None):
        logits = torch.full((len(batch), VOCAB), -10.0)
        for i, s in enumerate(batch):
            for j, t in enumerate(s.token_ids):
                if t < 0:
                    assert future is not None, "a placeholder without the previous step's tokens"
                    t = int(future[-t - 1])
                    self.placeholders += 1
                pos = s.input_pos + j
                self.cache[s.pages[pos // self.page_size], pos % self.page_size] = t
            n = s.input_pos + len(s.token_ids)
            hist = [int(self.cache[s.pages[p // self.page_size], p % self.page_size]) for p in range(n)]
            assert -1 not in hist, "read a cache slot nobody wrote"
            h = sum(x * (k + 1) for k, x in enumerate(hist)) * 31 + n
            logits[i] = torch.sin(torch.arange(VOCAB) * 0.37 + h)  # a spread distribution, argmax depends on history
        return logits


def _engine(overlap, num_pages=64, page=4, bs=4, tokens=64, chunked=False, max_seq_len=256, eos=()):
    pool = PagePool(num_pages, page)
    sched = Scheduler(pool, bs, tokens, chunked, num_pages)
    return Engine(FuturePagedRunner(num_pages, page), sched, None, max_seq_len, list(eos), overlap=overlap)


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 30))] for _ in range(n)]


def _run(engine, prompts, params):
    reqs = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    engine.run_until_done(reqs)
    return reqs


def _clean(eng):
    assert not eng.has_unfinished
    assert eng.scheduler.pool.num_free_pages == eng.scheduler.num_pages and not eng.scheduler.pool.seq_ids()
    assert sorted(eng.scheduler._free_slots) == list(range(eng.scheduler.max_batch_size))


@pytest.mark.parametrize("chunked", [False, True])
def test_overlap_equals_sync_with_preemption_and_chunking(chunked):
    prompts = _prompts(24)
    params = [SamplingParams(max_tokens=3 + i % 9, temperature=0.0, ignore_eos=True) for i in range(24)]
    kw = dict(num_pages=12, page=4, bs=4, tokens=24 if chunked else 64, chunked=chunked)
    sync = _run(_engine(False, **kw), prompts, params)
    eng = _engine(True, **kw)
    over = _run(eng, prompts, params)
    assert [r.output_token_ids for r in over] == [r.output_token_ids for r in sync]
    assert all(r.finish_reason == "length" for r in over)
    assert sum(r.num_preemptions for r in over) > 0, "the small pool should force preemption"
    assert eng.runner.placeholders > 0, "no input came from the device: overlap did not run"
    _clean(eng)


def test_overlap_equals_sync_for_end_tokens_stop_ids_seeds_and_max_seq_len():
    prompts = _prompts(12, seed=3)
    first = _run(_engine(False), prompts[:1], [SamplingParams(max_tokens=8, temperature=0.0)])[0].output_token_ids
    params = [
        SamplingParams(max_tokens=40, temperature=0.0),  # runs into max_seq_len 48 for long prompts
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[first[2]]),
        SamplingParams(max_tokens=12, temperature=0.9, seed=11),  # seeded: its own generator, same draws
        SamplingParams(max_tokens=6, temperature=0.7, top_k=5, seed=5),
    ] * 3
    eos = (first[4],)
    sync = _run(_engine(False, max_seq_len=48, eos=eos), prompts, params)
    eng = _engine(True, max_seq_len=48, eos=eos)
    over = _run(eng, prompts, params)
    assert [(r.output_token_ids, r.finish_reason) for r in over] == [(r.output_token_ids, r.finish_reason) for r in sync]
    assert {r.finish_reason for r in over} == {"stop", "length"}
    _clean(eng)


def test_abort_while_a_step_is_in_flight_frees_everything():
    eng = _engine(True)
    long = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    a, b = eng.add_request([1, 2, 3], long), eng.add_request([4, 5], long)
    for _ in range(4):
        eng.step()
    assert a.future, "a's latest token is still on the device"
    eng.abort(a, "caller left")
    eng.run_until_done([b])
    assert a.status == RequestStatus.FAILED and not a.future
    alone = _run(_engine(False), [[4, 5]], [long])[0]
    assert b.output_token_ids == alone.output_token_ids
    _clean(eng)


def test_outputs_never_show_placeholders_between_steps():
    eng = _engine(True)
    reqs = [eng.add_request(p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)) for p in _prompts(4)]
    while eng.has_unfinished:
        for r in eng.step():
            assert all(t >= 0 for t in r.output_token_ids)
    assert all(len(r.output_token_ids) == 10 for r in reqs)
    _clean(eng)


def _runner_logprobs(history: list[int]) -> torch.Tensor:
    """The log-softmax of FuturePagedRunner's logits after `history` (the same float32 computation)."""
    h = sum(x * (k + 1) for k, x in enumerate(history)) * 31 + len(history)
    return torch.log_softmax(torch.sin(torch.arange(VOCAB) * 0.37 + h), dim=-1)


@pytest.mark.parametrize("chunked", [False, True])
def test_overlap_equals_sync_for_penalties_bias_min_tokens_and_logprobs(chunked):
    """Counts for penalties are kept on the device, so a token the host reads a step late still counts; logprobs
    come back with their token. Preemption (a small pool) must not reset either."""
    prompts = _prompts(16, seed=5)
    first = _run(_engine(False), prompts[:1], [SamplingParams(max_tokens=8, temperature=0.0)])[0].output_token_ids
    eos = (first[1],)
    params = [
        SamplingParams(max_tokens=10, temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5, logprobs=3),
        SamplingParams(max_tokens=9, temperature=0.0, repetition_penalty=1.7, logprobs=0),
        SamplingParams(max_tokens=8, temperature=0.8, seed=3, logit_bias={7: 3.0, 8: -100.0}, logprobs=2),
        SamplingParams(max_tokens=12, temperature=0.0, min_tokens=6, logit_bias={eos[0]: 50.0}),
    ] * 4
    kw = dict(num_pages=14, page=4, bs=4, tokens=24 if chunked else 64, chunked=chunked, eos=eos)
    sync = _run(_engine(False, **kw), prompts, params)
    eng = _engine(True, **kw)
    over = _run(eng, prompts, params)
    assert [(r.output_token_ids, r.logprobs, r.finish_reason) for r in over] == \
        [(r.output_token_ids, r.logprobs, r.finish_reason) for r in sync]
    assert sum(r.num_preemptions for r in over) > 0, "the small pool should force preemption"
    for r, p in zip(over, params):
        out = r.output_token_ids
        if p.logprobs is None:
            assert r.logprobs is None
        else:
            assert len(r.logprobs) == len(out)
            for pos, (tid, entries) in enumerate(zip(out, r.logprobs)):
                ref = _runner_logprobs(r.prompt_token_ids + out[:pos])
                assert abs(entries[tid] - float(ref[tid])) < 1e-5
                top = ref.topk(p.logprobs)
                assert all(abs(entries[int(t)] - float(v)) < 1e-5 for t, v in zip(top.indices, top.values))
        if p.frequency_penalty:  # a penalty of 1.5 per use on logits in [-1, 1]: no token twice
            assert len(set(out)) == len(out)
        if p.logit_bias and 8 in p.logit_bias:
            assert 8 not in out
        if p.min_tokens:  # the end token is forced by its bias, but held back for min_tokens
            assert r.finish_reason == "stop" and len(out) == p.min_tokens
    _clean(eng)
    assert not eng.sampler.processor._rows, "finished requests keep no count rows"


def test_engine_refuses_n_and_out_of_vocabulary_bias():
    eng = _engine(False)
    r = eng.add_request([1, 2], SamplingParams(n=2))
    assert r.status == RequestStatus.FAILED and "n is 2" in r.error
    # An engine that does not know its vocabulary finds the bad id when sampling: that request fails alone.
    bad, good = (eng.add_request([1, 2], SamplingParams(max_tokens=3, logit_bias=b)) for b in ({VOCAB: 1.0}, {3: 1.0}))
    eng.run_until_done([bad, good])
    assert bad.status == RequestStatus.FAILED and "logit_bias: token id 97 is outside" in bad.error
    assert good.finish_reason == "length" and len(good.output_token_ids) == 3
    eng.vocab_size = VOCAB
    r = eng.add_request([1, 2], SamplingParams(logit_bias={VOCAB: 1.0}))
    assert r.status == RequestStatus.FAILED and "logit_bias has token id 97" in r.error
    _clean(eng)


class GraphGreedyRunner(FuturePagedRunner):
    """Also hands out the greedy pick of decode steps as a CUDA-graph runner does (`last_greedy`): from one buffer
    that every such step rewrites after reading its placeholders, or `wrong` ids that show where it was used."""

    def __init__(self, num_pages: int, page_size: int, wrong: bool = False):
        super().__init__(num_pages, page_size)
        self.buf = torch.full((16,), -7, dtype=torch.long)
        self.wrong = wrong
        self.last_greedy = None
        self.picks = 0

    def forward(self, batch, num_prefill, future=None):
        logits = super().forward(batch, num_prefill, future)  # placeholders read first, as in the graph
        self.last_greedy = None
        if num_prefill == 0:
            b = len(batch)
            self.buf[:b] = 0 if self.wrong else logits.argmax(-1)
            self.last_greedy = self.buf[:b]
            self.picks += 1
        return logits


@pytest.mark.parametrize("overlap", [False, True])
def test_runner_greedy_pick_gives_the_same_tokens(overlap):
    prompts = _prompts(12, seed=3)
    params = [SamplingParams(max_tokens=4 + i % 7, temperature=0.0, ignore_eos=True) for i in range(12)]
    sync = _run(_engine(False), prompts, params)
    eng = _engine(overlap)
    eng.runner = GraphGreedyRunner(64, 4)
    got = _run(eng, prompts, params)
    assert [r.output_token_ids for r in got] == [r.output_token_ids for r in sync]
    assert eng.runner.picks > 0
    _clean(eng)


def test_runner_greedy_pick_is_taken_only_when_every_row_is_greedy():
    # The runner's pick is all zeros: tokens show which rows took it (every greedy batch) and which sampled.
    eng = _engine(False)
    eng.runner = GraphGreedyRunner(64, 4, wrong=True)
    greedy = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    alone = _run(eng, _prompts(1, seed=5), [greedy])[0]
    assert alone.output_token_ids[1:] == [0, 0]  # the first token came from a prefill step (no pick)
    assert alone.output_token_ids[0] != 0
    hot = SamplingParams(max_tokens=3, temperature=1.0, seed=1, ignore_eos=True)
    mixed = _run(eng, _prompts(2, seed=6), [greedy, hot])
    assert 0 not in mixed[0].output_token_ids  # a batch with a sampled row argmaxes the logits itself
