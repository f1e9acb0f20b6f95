"""The GEMVs with a fused prologue (residual add + RMSNorm; SiLU-and-multiply) against the unfused ops."""

import ad_runtime.kernels  # noqa: F401 - registers the ops
import pytest
import torch
import torch.nn.functional as F
from ad_runtime.kernels.triton import gemv as gemv_module
from ad_runtime.kernels.triton import rmsnorm as rmsnorm_module
from ad_runtime.kernels.triton import swiglu as swiglu_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NORM_GEMV = torch.ops.auto_deploy.triton_add_rmsnorm_gemv_linear
SWIGLU_GEMV = torch.ops.auto_deploy.triton_swiglu_gemv_linear


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _unfused_norm(x, r, nw, eps, w, b):
    normed, summed = rmsnorm_module.add_rmsnorm(x, r, nw, eps)
    return F.linear(normed.float(), w.float(), None if b is None else b.float()).to(x.dtype), summed


@pytest.mark.parametrize(
    "n, k, dtype, bias, atol",
    [(70, 100, torch.float32, False, 1e-4), (33, 1030, torch.bfloat16, True, 3e-2),
     (129, 96, torch.float16, False, 3e-3)],
)
def test_add_rmsnorm_gemv_matches_the_unfused_ops(n, k, dtype, bias, atol):
    # K not a multiple of the K step (1030, 100) and N not of the output block (70, 33, 129).
    x, r = _randn(1, 1, k, dtype=dtype, seed=1), _randn(1, 1, k, dtype=dtype, seed=2)
    nw = _randn(k, dtype=dtype, seed=3, scale=0.5) + 1
    w = _randn(n, k, dtype=dtype, seed=4, scale=k**-0.5)
    b = _randn(n, dtype=dtype, seed=5) if bias else None
    y, summed = gemv_module.add_rmsnorm_gemv(x, r, nw, 1e-5, w, b)
    ref_y, ref_sum = _unfused_norm(x, r, nw, 1e-5, w, b)
    assert y.shape == (1, 1, n) and y.dtype == dtype and summed.shape == x.shape
    assert torch.equal(summed, ref_sum)  # the residual stream is bit-exact: every later layer reads it
    torch.testing.assert_close(y, ref_y, atol=atol, rtol=atol)


@pytest.mark.parametrize("gate_first", [True, False])
@pytest.mark.parametrize("n, k, dtype, atol", [(40, 72, torch.float32, 1e-4), (65, 600, torch.bfloat16, 3e-2)])
def test_swiglu_gemv_matches_silu_times_up(n, k, dtype, atol, gate_first):
    gate_up = _randn(1, 1, 2 * k, dtype=dtype, seed=6)
    gate_off, up_off = (0, k) if gate_first else (k, 0)
    w = _randn(n, k, dtype=dtype, seed=7, scale=k**-0.5)
    y = gemv_module.swiglu_gemv(gate_up, gate_off, up_off, w, None)
    gf, u = gate_up[..., gate_off : gate_off + k].float(), gate_up[..., up_off : up_off + k].float()
    ref = F.linear((F.silu(gf) * u).to(dtype).float(), w.float()).to(dtype)
    assert y.shape == (1, 1, n)
    torch.testing.assert_close(y, ref, atol=atol, rtol=atol)


def test_silu_mul_kernel_for_many_rows():
    gate_up = _randn(3, 5, 2 * 70, dtype=torch.float32, seed=8)
    out = swiglu_module.silu_mul(gate_up, 70, 0, 70)
    torch.testing.assert_close(out, F.silu(gate_up[..., 70:]) * gate_up[..., :70], atol=1e-5, rtol=1e-5)


def test_ops_take_the_fused_kernel_for_one_row_only(monkeypatch):
    k, n = 48, 24
    calls = []
    for name in ("add_rmsnorm_gemv", "swiglu_gemv"):
        real = getattr(gemv_module, name)
        monkeypatch.setattr(gemv_module, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    nw, w = _randn(k, dtype=torch.float32, seed=9) + 1, _randn(n, k, dtype=torch.float32, seed=10, scale=0.2)
    for rows in (1, 4):
        x, r = _randn(1, rows, k, dtype=torch.float32, seed=11), _randn(1, rows, k, dtype=torch.float32, seed=12)
        y, summed = NORM_GEMV(x, r, nw, 1e-6, w, None)
        ref_y, ref_sum = _unfused_norm(x, r, nw, 1e-6, w, None)
        torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-4)
        assert torch.equal(summed, ref_sum)
        gate_up = _randn(1, rows, 2 * k, dtype=torch.float32, seed=13)
        ref = F.linear(F.silu(gate_up[..., :k]) * gate_up[..., k:], w)
        torch.testing.assert_close(SWIGLU_GEMV(gate_up, 0, k, w, None), ref, atol=1e-4, rtol=1e-4)
    assert calls == ["add_rmsnorm_gemv", "swiglu_gemv"]  # the 4-row calls took the unfused kernels


def test_fake_impl_shapes():
    with torch._subclasses.FakeTensorMode():
        x = torch.empty(1, 5, 16, dtype=torch.bfloat16)
        w = torch.empty(7, 16, dtype=torch.bfloat16)
        y, summed = NORM_GEMV(x, x, torch.empty(16, dtype=torch.bfloat16), 1e-5, w, None)
        act = SWIGLU_GEMV(torch.empty(1, 5, 32, dtype=torch.bfloat16), 0, 16, w, None)
    assert y.shape == act.shape == (1, 5, 7) and summed.shape == (1, 5, 16) and y.dtype == torch.bfloat16


def test_swiglu_gemv_refuses_offsets_past_the_row():
    with pytest.raises(ValueError, match="exceed the row"):
        gemv_module.swiglu_gemv(torch.zeros(1, 20, device=DEVICE), 0, 12, torch.zeros(4, 10, device=DEVICE), None)


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(6144, 4096), (28672, 4096), (960, 576)])
def test_add_rmsnorm_gemv_gpu_shapes(n, k):
    x, r = _randn(1, 1, k, dtype=torch.bfloat16, seed=14), _randn(1, 1, k, dtype=torch.bfloat16, seed=15)
    nw, w = _randn(k, dtype=torch.bfloat16, seed=16) + 1, _randn(n, k, dtype=torch.bfloat16, seed=17, scale=k**-0.5)
    y, summed = gemv_module.add_rmsnorm_gemv(x, r, nw, 1e-5, w, None)
    ref_y, ref_sum = _unfused_norm(x, r, nw, 1e-5, w, None)
    assert torch.equal(summed, ref_sum)
    torch.testing.assert_close(y.float(), ref_y.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(4096, 14336), (576, 1536)])
def test_swiglu_gemv_gpu_shapes(n, k):
    gate_up = _randn(1, 1, 2 * k, dtype=torch.bfloat16, seed=18)
    w = _randn(n, k, dtype=torch.bfloat16, seed=19, scale=k**-0.5)
    y = gemv_module.swiglu_gemv(gate_up, 0, k, w, None)
    ref = F.linear(swiglu_module.silu_mul(gate_up, 0, k, k).float(), w.float())
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=3e-2)
