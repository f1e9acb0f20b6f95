"""Penalties, logit_bias, min_tokens and logprobs in the sampler, against computations by hand."""

import math

import pytest
import torch
from ad_runtime.executor.logits_processing import apply_penalties
from ad_runtime.executor.logprobs import TokenLogprobs
from ad_runtime.executor.sampler import Sampler
from ad_runtime.sampling_params import SamplingParams

EOS = 4
# Greedy picks without any processing: token 0, always.
LOGITS = torch.tensor([[5.0, 3.5, 2.6, 0.0, 0.0]])


def test_penalties_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    counts = torch.tensor([[2, 1, 0, 0, 0]], dtype=torch.int32)  # generated: token 0 twice, token 1 once
    in_prompt = torch.tensor([[False, False, True, False, True]])  # the prompt holds tokens 2 and 4
    out = apply_penalties(logits, counts, in_prompt, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    # token 0: seen, positive: 2 / 2 = 1, then - 0.25 * 2 - 0.5 = 0
    # token 1: seen, negative: -1 * 2 = -2, then - 0.25 * 1 - 0.5 = -2.75
    # token 2: in the prompt only: 0.5 / 2 = 0.25 (no count: no presence or frequency)
    # token 3: never seen: 3
    # token 4: in the prompt, negative: -2 * 2 = -4
    assert out.tolist() == [[0.0, -2.75, 0.25, 3.0, -4.0]]


def test_penalty_rows_are_independent():
    logits = torch.ones(2, 2)
    counts = torch.tensor([[1, 0], [1, 0]], dtype=torch.int32)
    none = torch.zeros(2, 2, dtype=torch.bool)
    out = apply_penalties(logits, counts, none, torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]),
                          torch.tensor([0.0, -0.5]))
    assert out.tolist() == [[1.0, 1.0], [1.0 + 0.5 - 1.0, 1.0]]


def _greedy_run(params: SamplingParams, steps: int, logits: torch.Tensor = LOGITS, prompt=(1,)) -> list[int]:
    """The same logits at every step: only the state the sampler keeps (counts, tokens so far) changes the pick."""
    sampler = Sampler("cpu", eos_token_ids=[EOS])
    return [sampler.sample(logits, [params], [0], [list(prompt)]).tokens.item() for _ in range(steps)]


def test_frequency_penalty_by_hand():
    # frequency 1, logits 5, 3.5, 2.6: 0 (5 -> 4), 0 (4 -> 3), 1 (3.5 -> 2.5), 0 (3 -> 2), 2 (2.6 -> 1.6), 1 (2.5)
    assert _greedy_run(SamplingParams(temperature=0, frequency_penalty=1.0), 6) == [0, 0, 1, 0, 2, 1]


def test_presence_penalty_by_hand():
    # presence 2: 0 (5 -> 3), 1 (3.5 -> 1.5), then 0 for good (3 beats 2.6; presence does not grow)
    assert _greedy_run(SamplingParams(temperature=0, presence_penalty=2.0), 5) == [0, 1, 0, 0, 0]
    # a negative presence penalty rewards what was said: 0 forever
    assert _greedy_run(SamplingParams(temperature=0, presence_penalty=-2.0), 3) == [0, 0, 0]


def test_repetition_penalty_by_hand_over_prompt_and_output():
    # prompt [1], penalty 2: 3.5 -> 1.75 at once; 0 (5 -> 2.5), 2 (2.6 -> 1.3), 0 (2.5, stays), 0
    assert _greedy_run(SamplingParams(temperature=0, repetition_penalty=2.0), 4) == [0, 2, 0, 0]
    # negative logits are multiplied: -1 -> -2 after one pick, so -1.5 wins, then -2 beats -3 and -2.5
    negative = torch.tensor([[-1.0, -1.5, -2.5, -9.0, -9.0]])
    assert _greedy_run(SamplingParams(temperature=0, repetition_penalty=2.0), 3, negative, prompt=()) == [0, 1, 0]


def test_logit_bias_forces_and_bans():
    assert _greedy_run(SamplingParams(temperature=0, logit_bias={3: 10.0}), 2) == [3, 3]
    assert _greedy_run(SamplingParams(temperature=0, logit_bias={0: -100.0}), 2) == [1, 1]
    # at temperature 1, +100 leaves every other token e^-95 times less likely
    assert _greedy_run(SamplingParams(temperature=1.0, seed=1, logit_bias={2: 100.0}), 20) == [2] * 20
    with pytest.raises(ValueError, match="logit_bias: token id 9 is outside the vocabulary"):
        Sampler("cpu").sample(LOGITS, [SamplingParams(logit_bias={9: 1.0})], [0])


def test_min_tokens_masks_end_and_stop_tokens_until_reached():
    eos_first = torch.tensor([[0.0, 1.0, 0.0, 5.0, 9.0]])  # greedy: EOS, then 3
    assert _greedy_run(SamplingParams(temperature=0, min_tokens=2), 3, eos_first) == [3, 3, EOS]
    stop3 = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3])
    assert _greedy_run(stop3, 3, eos_first) == [1, 1, EOS]
    # with ignore_eos the end token does not end the request, so it is not held back
    assert _greedy_run(SamplingParams(temperature=0, min_tokens=2, ignore_eos=True), 1, eos_first) == [EOS]


def test_processing_leaves_plain_rows_and_the_callers_logits_alone():
    logits = torch.tensor([[5.0, 3.5, 2.6, 0.0, 0.0]] * 3)
    before = logits.clone()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias={2: 10.0}),
              SamplingParams(temperature=0, presence_penalty=2.0)]
    s = Sampler("cpu")
    assert s.sample(logits, params, [0, 1, 2], [[1]] * 3).tokens.tolist() == [0, 2, 0]
    assert s.sample(logits, params, [0, 1, 2], [[1]] * 3).tokens.tolist() == [0, 2, 1]
    assert torch.equal(logits, before)
    s.release(2)  # a new request in the released row starts from zero counts
    assert s.sample(logits, params, [0, 1, 3], [[1]] * 3).tokens.tolist() == [0, 2, 0]


def test_count_tables_grow_and_keep_each_requests_counts():
    s = Sampler("cpu")
    n = 20  # more rows than the first table holds
    logits = LOGITS.expand(n, 5)
    params = [SamplingParams(temperature=0, frequency_penalty=1.0)] * n
    picks = [s.sample(logits, params[: i + 1], list(range(i + 1)), [[1]] * (i + 1)).tokens.tolist()
             for i in range(n)]
    # request j has been sampled n - j times; its picks follow the frequency sequence from the start
    seq = [0, 0, 1, 0, 2, 1]
    for j in range(6):
        assert [picks[i][j] for i in range(j, min(n, j + 6))] == seq[: min(n, j + 6) - j]


def test_logprobs_are_the_raw_log_softmax():
    probs = [0.1, 0.2, 0.3, 0.4]
    logits = torch.log(torch.tensor([probs]))
    s = Sampler("cpu")
    # penalties, bias and temperature change the pick, not the logprobs: bias forces token 0
    params = SamplingParams(temperature=0.5, seed=0, logprobs=2, logit_bias={0: 100.0}, presence_penalty=1.0)
    out = s.sample(logits, [params], [0], [[1]])
    assert out.tokens.tolist() == [0]
    (row,) = out.logprobs.by_row(out.tokens.tolist()).values()
    assert list(row) == [0, 3, 2]  # the sampled token first, then the top 2, best first
    for t, v in row.items():
        assert v == pytest.approx(math.log(probs[t]), abs=1e-6)
    only = s.sample(logits, [SamplingParams(temperature=0, logprobs=0)], [1]).logprobs.by_row([3])
    assert only == {0: {3: pytest.approx(math.log(0.4), abs=1e-6)}}
    assert s.sample(logits, [SamplingParams(temperature=0)], [2]).logprobs is None


def test_logprobs_of_some_rows_and_concat():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25] * 4]))
    params = [SamplingParams(temperature=0, logprobs=1), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logprobs=3)]
    out = Sampler("cpu").sample(logits, params, [0, 1, 2])
    rows = out.logprobs.by_row(out.tokens.tolist())
    assert set(rows) == {0, 2} and list(rows[0]) == [3] and len(rows[2]) == 3
    a = TokenLogprobs([0], [1], torch.tensor([-1.0]), torch.tensor([[5]]), torch.tensor([[-0.5]]))
    b = TokenLogprobs([1], [2], torch.tensor([-2.0]), torch.tensor([[6, 7]]), torch.tensor([[-0.25, -0.5]]))
    both = TokenLogprobs.concat([a, None, b], [2, 1, 3])
    assert both.rows == [0, 4] and both.top_ids.shape == (2, 2)
    assert both.by_row([9, 0, 0, 0, 8]) == {0: {9: -1.0, 5: -0.5}, 4: {8: -2.0, 6: -0.25, 7: -0.5}}
    assert TokenLogprobs.concat([None], [1]) is None


@pytest.mark.parametrize("kw, field", [
    ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"logit_bias": {"3": 1.0}}, "logit_bias"),
    ({"logit_bias": {3: 101}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
])
def test_invalid_values_name_their_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingParams(**kw)


def test_choices_get_their_own_seeds():
    assert SamplingParams(n=1, seed=4).for_choices() == [SamplingParams(seed=4)]
    assert [p.seed for p in SamplingParams(n=3, seed=2**64 - 2).for_choices()] == [2**64 - 2, 2**64 - 1, 0]
    assert [(p.n, p.seed) for p in SamplingParams(n=2).for_choices()] == [(1, None), (1, None)]
