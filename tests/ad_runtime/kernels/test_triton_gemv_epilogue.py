"""The GEMV with a fused add+RMSNorm epilogue (the last program normalises the row) against the unfused kernels."""

import ad_runtime.kernels  # noqa: F401 - registers the ops
import pytest
import torch
from ad_runtime.kernels.triton import gemv as gemv_module
from ad_runtime.kernels.triton import rmsnorm as rmsnorm_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEMV_NORM = torch.ops.auto_deploy.triton_gemv_add_rmsnorm


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _inputs(n, k, dtype, bias, rows=1):
    x = _randn(rows, 1, k, dtype=dtype, seed=1)
    w = _randn(n, k, dtype=dtype, seed=2, scale=k**-0.5)
    b = _randn(n, dtype=dtype, seed=3) if bias else None
    r = _randn(rows, 1, n, dtype=dtype, seed=4)
    nw = _randn(n, dtype=dtype, seed=5, scale=0.5) + 1
    return x, w, b, r, nw


def _unfused(x, w, b, r, nw, eps):
    return rmsnorm_module.add_rmsnorm(gemv_module.gemv(x, w, b), r, nw, eps)


@pytest.mark.parametrize(
    "n, k, dtype, bias",
    [(70, 100, torch.float32, False), (33, 1030, torch.bfloat16, True), (576, 1536, torch.float16, False)],
)
def test_same_bits_as_the_gemv_then_add_rmsnorm(n, k, dtype, bias):
    # N not a multiple of the output block (70, 33), more programs than one (576 rows of 4): the last one normalises.
    x, w, b, r, nw = _inputs(n, k, dtype, bias)
    ref_normed, ref_sum = _unfused(x, w, b, r, nw, 1e-5)
    for _ in range(3):  # the count of finished programs is back to 0 after every launch
        normed, summed = gemv_module.gemv_add_rmsnorm(x, w, b, r, nw, 1e-5)
        assert torch.equal(normed, ref_normed) and torch.equal(summed, ref_sum)
    assert int(gemv_module._counter(x.device)) == 0
    # The output row starts as NaN: a norm that ran before every program had stored its part would show it.
    y = torch.full((n,), float("nan"), dtype=dtype, device=DEVICE)
    normed, summed = torch.empty_like(ref_normed).view(n), torch.empty_like(ref_sum).view(n)
    gemv_module._launch(x.view(k), w, b, y, k, residual=r.view(n), norm_weight=nw, summed=summed, eps=1e-5,
                        normed=normed)
    assert torch.equal(normed, ref_normed.view(n)) and torch.equal(summed, ref_sum.view(n))


def test_op_takes_the_unfused_kernels_for_more_rows(monkeypatch):
    x, w, b, r, nw = _inputs(40, 64, torch.float32, True, rows=3)
    calls = []
    monkeypatch.setattr(gemv_module, "gemv_add_rmsnorm", lambda *a: calls.append(1))
    normed, summed = GEMV_NORM(x, w, b, r, nw, 1e-6)
    ref_normed, ref_sum = rmsnorm_module.add_rmsnorm(torch.nn.functional.linear(x, w, b), r, nw, 1e-6)
    assert not calls and torch.equal(normed, ref_normed) and torch.equal(summed, ref_sum)


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336), (576, 576)])
def test_llama_shapes_on_gpu(n, k):
    x, w, b, r, nw = _inputs(n, k, torch.bfloat16, False)
    ref = _unfused(x, w, b, r, nw, 1e-5)
    for _ in range(5):
        out = GEMV_NORM(x, w, b, r, nw, 1e-5)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    # Captured in a CUDA graph and replayed: the counter is reset inside every launch.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = GEMV_NORM(x, w, b, r, nw, 1e-5)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], ref[0]) and torch.equal(captured[1], ref[1])
