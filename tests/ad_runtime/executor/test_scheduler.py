"""Scheduler: admission limits, chunked prefill, prefill-first order, preemption under page pressure."""

from ad_runtime.executor.request import Request, RequestStatus
from ad_runtime.executor.scheduler import Scheduler
from ad_runtime.kv_cache.page_pool import PagePool
from ad_runtime.sampling_params import SamplingParams


def _req(i: int, n: int) -> Request:
    return Request(request_id=i, prompt_token_ids=list(range(n)), params=SamplingParams(max_tokens=4))


def _make(num_pages=16, page=4, bs=4, tokens=64, chunked=False) -> Scheduler:
    return Scheduler(PagePool(num_pages, page), bs, tokens, chunked, num_pages)


def _advance(batch):
    """Pretend the model ran: mark tokens cached and append one sampled token where due."""
    for s in batch:
        done = s.completes_prompt
        s.request.num_computed_tokens += s.num_new_tokens
        if done:
            s.request.output_token_ids.append(0)


def test_admission_limited_by_batch_size_and_tokens():
    s = _make(bs=2, tokens=64)
    for i in range(4):
        s.add(_req(i, 10))
    batch = s.schedule()
    assert [b.request.request_id for b in batch] == [0, 1]
    assert all(b.num_new_tokens == 10 for b in batch)
    s2 = _make(bs=8, tokens=25)
    for i in range(4):
        s2.add(_req(i, 10))
    assert [b.request.request_id for b in s2.schedule()] == [0, 1]


def test_chunked_prefill_splits_long_prompt_and_orders_prefill_first():
    s = _make(num_pages=32, tokens=16, chunked=True)
    s.add(_req(0, 3))
    _advance(s.schedule())  # request 0 now decodes
    s.add(_req(1, 40))
    batch = s.schedule()
    assert [(b.request.request_id, b.num_new_tokens, b.is_decode) for b in batch] == [(1, 15, False), (0, 1, True)]
    _advance(batch)
    batch = s.schedule()
    assert batch[0].request.request_id == 1 and batch[0].num_new_tokens == 15
    assert not batch[0].completes_prompt


def test_without_chunking_long_prompt_waits():
    s = _make(tokens=16, chunked=False)
    s.add(_req(0, 40))
    assert s.schedule() == []


def test_preempts_newest_when_pages_run_out_and_recomputes():
    s = _make(num_pages=4, page=4, bs=4, tokens=64)
    s.add(_req(0, 8))
    s.add(_req(1, 8))
    batch = s.schedule()
    assert len(batch) == 2 and s.pool.num_free_pages == 0
    _advance(batch)  # each has 9 tokens, 8 cached in 2 pages; the decode needs a 3rd page
    batch = s.schedule()
    ids = [b.request.request_id for b in batch]
    assert ids == [0]
    r1 = [r for r in s.waiting][0]
    assert r1.request_id == 1 and r1.status == RequestStatus.WAITING and r1.num_computed_tokens == 0
    assert r1.num_pending_tokens == 9  # prompt + its sampled token are recomputed


def test_finish_frees_pages():
    s = _make()
    s.add(_req(0, 9))
    batch = s.schedule()
    assert s.pool.num_free_pages == 16 - 3
    s.finish(batch[0].request)
    assert s.pool.num_free_pages == 16 and not s.running


def test_one_token_prompt_goes_after_longer_prompts():
    """The step metadata wants multi-token rows first: a one-token prompt runs with the decodes."""
    s = _make(bs=4)
    s.add(_req(0, 1))
    s.add(_req(1, 6))
    batch = s.schedule()
    assert [(b.request.request_id, b.num_new_tokens) for b in batch] == [(1, 6), (0, 1)]


def test_running_requests_hold_distinct_slots_until_they_end():
    s = _make(num_pages=8, page=4, bs=2)
    reqs = [_req(i, 5) for i in range(3)]
    for r in reqs:
        s.add(r)
    s.schedule()
    assert {reqs[0].slot, reqs[1].slot} == {0, 1} and reqs[2].slot is None  # two slots for max_batch_size 2
    s.finish(reqs[0])
    freed = reqs[0].slot
    assert freed is None
    s.schedule()
    assert reqs[2].slot is not None and reqs[2].slot != reqs[1].slot
    s.preempt(reqs[1])
    assert reqs[1].slot is None
