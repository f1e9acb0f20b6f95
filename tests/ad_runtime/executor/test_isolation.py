"""A failing request fails alone: the engine and its core stay consistent after any error, on any thread."""

import math
import threading

import pytest
import torch
from ad_runtime.executor.core import EngineCore
from ad_runtime.executor.engine import Engine
from ad_runtime.executor.request import RequestStatus
from ad_runtime.executor.scheduler import Scheduler
from ad_runtime.kv_cache.page_pool import PagePool
from ad_runtime.sampling_params import SamplingParams

VOCAB = 50
NUM_PAGES = 64
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


class CountingRunner:
    """Predicts (last token * 7 + position) % VOCAB: deterministic, depends on the sequence's own history only."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.fail_next = 0

    def forward(self, batch, num_prefill):
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("CUDA out of memory\n(a two-line message)")
        logits = torch.zeros(len(batch), VOCAB)
        for i, s in enumerate(batch):
            pos = s.input_pos + len(s.token_ids)
            logits[i, (s.token_ids[-1] * 7 + pos) % VOCAB] = 5.0
        return logits


def _engine(bs: int = 4) -> Engine:
    pool = PagePool(NUM_PAGES, 4)
    return Engine(CountingRunner(), Scheduler(pool, bs, 64, False, NUM_PAGES), None, 128, [0], vocab_size=VOCAB)


def _alone(prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    eng = _engine()
    req = eng.add_request(prompt, params)
    eng.run_until_done([req])
    return req.output_token_ids


def _assert_clean(eng: Engine) -> None:
    assert not eng.has_unfinished
    assert eng.scheduler.pool.num_free_pages == NUM_PAGES and not eng.scheduler.pool.seq_ids()
    assert sorted(eng.scheduler._free_slots) == list(range(eng.scheduler.max_batch_size))
    assert not eng.sampler._generators


@pytest.mark.parametrize(
    "field, value",
    [("seed", 2**70), ("seed", -1), ("temperature", math.inf), ("temperature", math.nan), ("top_p", math.nan),
     ("stop", [None]), ("stop", 5), ("max_tokens", 0), ("max_tokens", 10**30), ("top_k", -2), ("stop_token_ids", ["a"])],
)
def test_bad_sampling_params_are_refused_where_they_are_made(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_a_huge_seed_smuggled_past_validation_fails_its_request_alone():
    eng = _engine()
    bad_params = SamplingParams(max_tokens=6, seed=1)
    bad_params.seed = 2**70  # changed after validation: the engine must still contain it
    good = eng.add_request([3, 4, 5], GREEDY)
    bad = eng.add_request([6, 7], bad_params)
    assert bad.status == RequestStatus.FAILED and "invalid request" in bad.error and "\n" not in bad.error
    eng.run_until_done([good])
    assert good.output_token_ids == _alone([3, 4, 5])
    after = eng.add_request([9, 9], GREEDY)
    eng.run_until_done([after])
    assert after.output_token_ids == _alone([9, 9])
    _assert_clean(eng)


def test_a_stop_check_that_raises_fails_its_request_alone_in_a_shared_batch():
    eng = _engine()
    broken = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, stop=["x"])
    broken.stop = [None]  # smuggled past validation: the detokenizer's stop check raises TypeError on it
    eng.detok.tokenizer = type("Tok", (), {"decode": lambda self, ids, skip_special_tokens=True: "text"})()
    reqs = [eng.add_request([1, 2], GREEDY), eng.add_request([5], broken), eng.add_request([8, 8, 8], GREEDY)]
    eng.run_until_done(reqs)
    assert reqs[1].status == RequestStatus.FAILED and reqs[1].error.startswith("post-processing failed: TypeError")
    assert [reqs[0].output_token_ids, reqs[2].output_token_ids] == [_alone([1, 2]), _alone([8, 8, 8])]
    _assert_clean(eng)


def test_a_sampling_error_of_one_row_fails_only_that_request():
    eng = _engine()
    seeded = SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    reqs = [eng.add_request([1, 2], GREEDY), eng.add_request([4], seeded), eng.add_request([7, 7], GREEDY)]
    real = eng.sampler.generator_for

    def broken(request_id, seed):
        if seed is not None:
            raise RuntimeError("generator exploded")
        return real(request_id, seed)

    eng.sampler.generator_for = broken  # type: ignore[method-assign]
    eng.run_until_done(reqs)
    assert reqs[1].status == RequestStatus.FAILED and "generator exploded" in reqs[1].error
    assert [reqs[0].output_token_ids, reqs[2].output_token_ids] == [_alone([1, 2]), _alone([7, 7])]
    _assert_clean(eng)


def test_a_model_error_fails_its_step_and_the_next_requests_succeed():
    eng = _engine()
    eng.runner.fail_next = 1
    first = [eng.add_request([1, 2], GREEDY), eng.add_request([3], GREEDY)]
    changed = eng.step()
    assert set(map(id, changed)) == set(map(id, first))
    assert all(r.status == RequestStatus.FAILED for r in first)
    assert first[0].error == "engine step failed: RuntimeError: CUDA out of memory (a two-line message)"
    _assert_clean(eng)
    again = eng.add_request([1, 2], GREEDY)
    eng.run_until_done([again])
    assert again.output_token_ids == _alone([1, 2])
    _assert_clean(eng)


def test_a_prompt_longer_than_a_step_without_chunking_fails_at_once():
    eng = _engine()
    req = eng.add_request(list(range(1, 40)) * 2, GREEDY)  # 78 tokens > max_num_tokens 64, chunking off
    assert req.status == RequestStatus.FAILED and "max_num_tokens" in req.error
    _assert_clean(eng)


def test_core_survives_a_scheduler_error_and_serves_on():
    core = EngineCore(_engine())
    req = core.submit([1, 2], GREEDY)
    real = core.engine.scheduler.schedule
    core.engine.scheduler.schedule = lambda **_: (_ for _ in ()).throw(RuntimeError("scheduler bug"))  # type: ignore
    assert core.step() == [req] and req.status == RequestStatus.FAILED and "scheduler bug" in req.error
    core.engine.scheduler.schedule = real  # type: ignore[method-assign]
    again = core.submit([1, 2], GREEDY)
    core.run([again])
    assert again.output_token_ids == _alone([1, 2])
    _assert_clean(core.engine)


def test_many_threads_share_one_core_and_get_their_own_tokens():
    core = EngineCore(_engine(bs=3))
    prompts = [[i % VOCAB + 1, (i * 3) % VOCAB + 1] for i in range(24)]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def caller(k: int) -> None:
        try:
            start.wait()
            mine = list(range(k, 24, 6))
            reqs = [core.submit(prompts[i], GREEDY) for i in mine]
            if k % 2:
                streamed = [list(r.output_token_ids) for r in core.stream(reqs[0])]
                assert streamed[-1] == reqs[0].output_token_ids and reqs[0].is_finished
            core.run(reqs)
            for i, r in zip(mine, reqs):
                results[i] = r.output_token_ids
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert [results[i] for i in range(24)] == [_alone(p) for p in prompts]
    _assert_clean(core.engine)
