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


def _reference_draw(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    """One row the textbook way: temperature, top-k mask, top-p mask over a second sort, softmax, then the
    exponential race over the vocabulary in token order with the row's own generator."""
    x = logits / p.temperature
    if p.top_k:
        x = x.masked_fill(x < x.topk(p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        vals, idx = torch.sort(x, descending=True)
        probs = torch.softmax(vals, -1)
        drop = torch.zeros_like(x, dtype=torch.bool)
        drop[idx] = torch.cumsum(probs, -1) - probs >= p.top_p
        x = x.masked_fill(drop, float("-inf"))
    noise = torch.empty_like(x).exponential_(generator=gen)
    return int(torch.argmax(torch.softmax(x, -1) / noise))


def test_seeded_rows_draw_like_the_reference_whatever_their_batch():
    """One sort serves top-k and top-p and the race runs in sorted order (top-k alone: a partial selection, no
    sort), yet a seeded row gets the token the textbook procedure gives with the same generator, alone or beside
    rows that sort, cut or take the argmax."""
    torch.manual_seed(2)
    logits = torch.randn(5, 300) * 3
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=3), SamplingParams(temperature=1.3, seed=4),
              SamplingParams(temperature=0.0), SamplingParams(top_k=20, top_p=0.95, seed=5),
              SamplingParams(temperature=4.0, top_k=7, seed=6)]
    gens = {i: torch.Generator().manual_seed(params[i].seed) for i in (0, 1, 3, 4)}
    expected = {i: [] for i in gens}
    for _ in range(20):
        for i, g in gens.items():
            expected[i].append(_reference_draw(logits[i], params[i], g))
    together, alone = Sampler("cpu"), Sampler("cpu")
    got_together = {i: [] for i in gens}
    got_alone = {i: [] for i in gens}
    for _ in range(20):
        out = together(logits, params, [0, 1, 2, 3, 4]).tolist()
        assert out[2] == int(logits[2].argmax())
        for i in gens:
            got_together[i].append(out[i])
            got_alone[i].append(alone(logits[i : i + 1], [params[i]], [i]).item())
    assert got_together == got_alone == expected
    assert all(len(set(v)) > 1 for v in expected.values())  # the draws are draws, not an argmax


def test_invalid_params_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="unknown sampling"):
        SamplingParams.from_kwargs({"temprature": 1.0})


def test_flashinfer_kernels_that_fail_to_run_leave_the_torch_path_with_a_warning(monkeypatch, caplog):
    """A FlashInfer whose sampling kernels cannot run (a failed JIT compile) is found at warm-up, said once, and
    every top-p batch then samples with torch instead of failing."""
    from types import SimpleNamespace

    from ad_runtime.executor import flashinfer_sampling as fs

    def broken(*a, **k):
        raise RuntimeError("ninja: build stopped")

    monkeypatch.setattr(fs, "flashinfer_sampling", lambda: SimpleNamespace(top_p_sampling_from_probs=broken,
                                                                         top_k_top_p_sampling_from_logits=broken))
    monkeypatch.setattr(fs, "_failed", [])
    cpu_zeros = torch.zeros
    with caplog.at_level("WARNING"), monkeypatch.context() as m:
        m.setattr(torch, "zeros", lambda *a, device=None, **k: cpu_zeros(*a, **k))  # the probe logits, on this CPU
        fs.warm_up(torch.device("cuda"))
    assert "failed to run (ninja: build stopped)" in caplog.text
    assert not fs.can_draw(torch.zeros(1, 4), cut_p=True, seeded=False)
