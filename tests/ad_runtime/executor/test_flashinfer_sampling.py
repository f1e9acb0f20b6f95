"""Top-p batches on a GPU drawn by FlashInfer's sorting-free kernels: only tokens of each row's nucleus (after its
top-k), at the nucleus' renormalised probabilities; a batch with a seeded row keeps the torch path."""

import pytest
import torch
from ad_runtime.executor import flashinfer_sampling
from ad_runtime.executor.sampler import Sampler
from ad_runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

ROWS = 6000


def _flashinfer_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if flashinfer_sampling.flashinfer_sampling() is None:
        pytest.skip("flashinfer is not installed")


def _expected(probs: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """The distribution the torch path samples: top-k, renormalise, keep the nucleus, renormalise."""
    p = probs.clone()
    if top_k:
        p[p < p.topk(top_k).values[-1]] = 0
        p /= p.sum()
    vals, idx = torch.sort(p, descending=True)
    keep = torch.cumsum(vals, 0) - vals < top_p
    out = torch.zeros_like(p)
    out[idx[keep]] = vals[keep]
    return out / out.sum()


@pytest.mark.parametrize("top_k, top_p", [(None, 0.7), (3, 0.9)])
def test_flashinfer_draws_from_the_nucleus_at_its_probabilities(monkeypatch, top_k, top_p):
    _flashinfer_or_skip()
    sampler = Sampler("cuda")  # starts loading the kernels (a compile on a machine's first use)
    assert flashinfer_sampling.wait_ready(timeout=900), "FlashInfer's sampling kernels did not load"
    calls = []
    real = flashinfer_sampling.draw
    monkeypatch.setattr(flashinfer_sampling, "draw", lambda *a: calls.append(1) or real(*a))
    probs = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.04, 0.02, 0.01])
    logits = torch.log(probs).expand(ROWS, -1).contiguous().cuda()
    params = [SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)] * ROWS
    out = sampler(logits, params, list(range(ROWS))).cpu()
    assert calls, "the FlashInfer path was not taken"
    want = _expected(probs, top_k, top_p)
    freq = torch.bincount(out, minlength=len(probs)).float() / ROWS
    assert set(out.unique().tolist()) == set(want.nonzero().flatten().tolist())
    assert torch.allclose(freq, want, atol=0.025), (freq, want)


def test_a_seeded_row_keeps_the_torch_path(monkeypatch):
    _flashinfer_or_skip()
    first_sampler, second_sampler = Sampler("cuda"), Sampler("cuda")
    monkeypatch.setattr(flashinfer_sampling, "draw", lambda *a: pytest.fail("FlashInfer drew a seeded batch"))
    logits = torch.randn(3, 50, device="cuda")
    params = [SamplingParams(top_p=0.8), SamplingParams(top_p=0.8, seed=1), SamplingParams(temperature=0.0)]
    first = first_sampler(logits, params, [0, 1, 2]).tolist()
    again = second_sampler(logits, params, [0, 1, 2]).tolist()
    assert first[1] == again[1] and first[2] == again[2] == int(logits[2].argmax())


def test_the_switch_keeps_the_torch_path(monkeypatch):
    _flashinfer_or_skip()
    monkeypatch.setenv("AUTODEPLOY_FLASHINFER_SAMPLING", "0")
    flashinfer_sampling.flashinfer_sampling.cache_clear()
    try:
        assert not flashinfer_sampling.can_draw(torch.zeros(1, 4, device="cuda"), cut_p=True, seeded=False)
    finally:
        monkeypatch.undo()
        flashinfer_sampling.flashinfer_sampling.cache_clear()
