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


@pytest.fixture
def fresh_loader(monkeypatch):
    """flashinfer_sampling's per-process loader state, fresh for one test."""
    import threading

    from ad_runtime.executor import flashinfer_sampling as fs

    monkeypatch.setattr(fs, "_ready", threading.Event())
    monkeypatch.setattr(fs, "_loader", [])
    monkeypatch.setattr(fs, "_failed", [])
    return fs


def test_flashinfer_kernels_load_in_the_background_and_torch_samples_until_then(monkeypatch, fresh_loader):
    """The loader compiles on its own thread: the build goes on, top-p batches take the torch path until the
    kernels are ready, then FlashInfer's; one loader per process."""
    import threading
    from types import SimpleNamespace

    fs, release, compiles = fresh_loader, threading.Event(), []

    def compile_module():
        compiles.append(1)
        assert release.wait(60)

    monkeypatch.setattr(fs, "flashinfer_sampling", lambda: SimpleNamespace(get_sampling_module=compile_module))
    gpu_logits = SimpleNamespace(is_cuda=True)
    fs.start_loading(torch.device("cuda"))
    fs.start_loading(torch.device("cuda"))
    assert not fs.wait_ready(timeout=0.01)  # still compiling: the caller was not held up
    assert not fs.can_draw(gpu_logits, cut_p=True, seeded=False)
    release.set()
    assert fs.wait_ready(timeout=60)
    assert fs.can_draw(gpu_logits, cut_p=True, seeded=False)
    assert not fs.can_draw(gpu_logits, cut_p=True, seeded=True) and not fs.can_draw(torch.zeros(1, 4), True, False)
    assert compiles == [1]
    monkeypatch.setattr(fs, "flashinfer_sampling", lambda: None)  # the switch, AUTODEPLOY_FLASHINFER_SAMPLING=0
    assert not fs.can_draw(gpu_logits, cut_p=True, seeded=False)
    fs.start_loading(torch.device("cpu"))  # a CPU sampler starts nothing
    assert len(fs._loader) == 1


def test_flashinfer_kernels_that_fail_to_compile_leave_the_torch_path_with_a_warning(monkeypatch, caplog,
                                                                                      fresh_loader):
    """A failed JIT compile is said once, and every top-p batch then samples with torch instead of failing."""
    from types import SimpleNamespace

    fs = fresh_loader

    def broken():
        raise RuntimeError("ninja: build stopped")

    monkeypatch.setattr(fs, "flashinfer_sampling", lambda: SimpleNamespace(get_sampling_module=broken))
    with caplog.at_level("WARNING"):
        fs.start_loading(torch.device("cuda"))
        assert not fs.wait_ready(timeout=60)
    assert "failed to compile or load (ninja: build stopped)" in caplog.text
    assert not fs.can_draw(SimpleNamespace(is_cuda=True), cut_p=True, seeded=False)


def test_flashinfer_kernels_that_fail_to_run_leave_the_torch_path_with_a_warning(monkeypatch, caplog, fresh_loader):
    """Kernels that load but cannot run (built for another GPU) fail their first batch over to torch's sort, said
    once; later batches go to torch directly."""
    from types import SimpleNamespace

    fs = fresh_loader

    def broken(*a, **k):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(fs, "flashinfer_sampling", lambda: SimpleNamespace(top_p_sampling_from_probs=broken,
                                                                         top_k_top_p_sampling_from_logits=broken))
    fs._ready.set()
    sampler = Sampler("cpu")
    logits = torch.randn(3, 50)
    params = [SamplingParams(top_p=0.5)] * 3
    monkeypatch.setattr(fs, "can_draw", lambda *a: not fs._failed)  # this CPU tensor stands in for a GPU's
    with caplog.at_level("WARNING"):
        out = sampler(logits, params, [0, 1, 2])
    assert "failed to run (no kernel image is available)" in caplog.text
    assert out.shape == (3,) and fs._failed
    nucleus = torch.softmax(logits, -1).sort(-1, descending=True)
    for row, token in enumerate(out.tolist()):
        kept = nucleus.indices[row][(nucleus.values[row].cumsum(0) - nucleus.values[row]) < 0.5]
        assert token in kept.tolist()
