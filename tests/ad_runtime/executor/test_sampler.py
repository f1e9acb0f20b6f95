"""Device sampler: greedy, top-k, top-p, temperature and per-request seeds."""

import pytest
import torch
from ad_runtime.executor.sampler import Sampler
from ad_runtime.sampling_params import SamplingParams


def test_greedy_and_degenerate_filters_pick_argmax():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=1e-4),
    ]
    out = Sampler("cpu")(logits, params, [0, 1, 2, 3])
    assert out.tolist() == logits.argmax(-1).tolist()


def test_greedy_bf16_logits_pick_the_first_maximum_as_in_float32():
    # Greedy batches take the argmax of the model's bf16 logits without a float32 copy: ties (frequent in bf16)
    # must resolve to the same, first, index.
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 1.0, 3.0, 3.0]], dtype=torch.bfloat16)
    out = Sampler("cpu")(logits, [SamplingParams(temperature=0.0)] * 2, [0, 1])
    assert out.tolist() == logits.float().argmax(-1).tolist() == [1, 0]


def test_seed_reproducible_and_top_k_respected():
    torch.manual_seed(0)
    logits = torch.randn(1, 100)
    allowed = set(logits[0].topk(5).indices.tolist())
    draws = []
    for _ in range(2):
        s = Sampler("cpu")
        draws.append([s(logits, [SamplingParams(top_k=5, seed=7)], [0]).item() for _ in range(30)])
    assert draws[0] == draws[1]
    assert set(draws[0]) <= allowed and len(set(draws[0])) > 1


def test_temperature_sampling_matches_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    s = Sampler("cpu")
    torch.manual_seed(1)
    n = 3000
    out = s(logits.expand(n, 3), [SamplingParams(temperature=1.0)] * n, list(range(n)))
    counts = torch.bincount(out, minlength=3).float()
    assert torch.allclose(counts / counts.sum(), torch.softmax(logits[0], -1), atol=0.03)


def test_top_p_keeps_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    s = Sampler("cpu")
    seen = {s(logits, [SamplingParams(top_p=0.7, seed=i)], [i]).item() for i in range(200)}
    assert seen == {0, 1}


def test_invalid_params_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="unknown sampling"):
        SamplingParams.from_kwargs({"temprature": 1.0})
