"""Programmatic dependent launch of the decode kernels: off without a Hopper GPU; on one, a chain of dependent
kernels captured in a CUDA graph answers exactly as the same chain launched without PDL."""

import pytest
import torch
from ad_runtime.kernels.triton import gemv, rmsnorm, rope
from ad_runtime.kernels.triton.pdl import pdl_launch_args


def test_off_on_a_cpu_and_when_switched_off(monkeypatch):
    assert pdl_launch_args(torch.device("cpu")) == {"USE_PDL": False}
    monkeypatch.setenv("AUTODEPLOY_TRITON_PDL", "0")
    assert pdl_launch_args(torch.device("cuda", 0)) == {"USE_PDL": False}


def _chain(x, r, w_norm, w1, w2, cache, pos):
    # Each kernel reads what the one before wrote: a kernel that read early would see stale or partial data.
    h = x
    for _ in range(8):
        n, r = rmsnorm.add_rmsnorm(h, r, w_norm, 1e-5)
        q = gemv.gemv(n, w1, None)  # [1, 4096]: 32 heads of 128
        q, k = rope.rope_with_cos_sin_cache(q.view(1, 1, 32, 128), q.view(1, 1, 32, 128)[:, :, :8], pos, cache)
        h = gemv.gemv(q.reshape(1, 4096) + k.reshape(1, 1024).repeat(1, 4), w2, None)
    return h, r


@pytest.mark.gpu
def test_captured_chain_with_pdl_equals_the_chain_without(monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs Hopper or newer")
    g = torch.Generator(device="cuda").manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(1, 4096, device=dev, dtype=dt, generator=g)
    r = torch.randn(1, 4096, device=dev, dtype=dt, generator=g)
    w_norm = torch.rand(4096, device=dev, dtype=dt, generator=g) + 0.5
    w1 = torch.randn(4096, 4096, device=dev, dtype=dt, generator=g) / 64
    w2 = torch.randn(4096, 4096, device=dev, dtype=dt, generator=g) / 64
    cache = torch.randn(64, 128, device=dev, dtype=torch.float32, generator=g)
    pos = torch.tensor([[37]], device=dev)
    monkeypatch.setenv("AUTODEPLOY_TRITON_PDL", "0")
    want = _chain(x, r, w_norm, w1, w2, cache, pos)
    monkeypatch.setenv("AUTODEPLOY_TRITON_PDL", "1")
    assert pdl_launch_args(x.device)["USE_PDL"]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _chain(x, r, w_norm, w1, w2, cache, pos)  # compiles the PDL variants outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = _chain(x, r, w_norm, w1, w2, cache, pos)
    for _ in range(20):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
