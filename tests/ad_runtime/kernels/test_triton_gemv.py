"""The Triton GEMV and auto_deploy::triton_gemv_linear against aten.linear."""

import ad_runtime.kernels  # noqa: F401 - registers triton_gemv_linear
import pytest
import torch
from ad_runtime.kernels.triton import gemv as gemv_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEMV_LINEAR = torch.ops.auto_deploy.triton_gemv_linear


def _data(n: int, k: int, dtype: torch.dtype, bias: bool, lead: tuple[int, ...] = (1,)):
    g = torch.Generator().manual_seed(n * 31 + k)
    x = torch.randn(*lead, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize(
    "n, k, dtype, bias, atol",
    [(70, 100, torch.float32, False, 1e-5), (64, 1030, torch.float32, True, 1e-5),
     (33, 48, torch.bfloat16, True, 2e-2), (129, 96, torch.float16, False, 2e-3)],
)
def test_one_row_matches_linear(n, k, dtype, bias, atol):
    # K not a multiple of the 512-wide K step (1030) and N not of the block of output features (70, 33, 129).
    x, w, b = _data(n, k, dtype, bias)
    out = gemv_module.gemv(x, w, b)
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    assert out.shape == (1, n) and out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)


def test_op_takes_the_gemv_for_one_row_and_aten_for_more(monkeypatch):
    x1, w, b = _data(40, 24, torch.float32, True, lead=(1, 1))
    calls = []
    real = gemv_module.gemv
    monkeypatch.setattr(gemv_module, "gemv", lambda *a: calls.append(1) or real(*a))
    out = GEMV_LINEAR(x1, w, b)
    assert calls == [1] and out.shape == (1, 1, 40)
    torch.testing.assert_close(out, torch.nn.functional.linear(x1, w, b), atol=1e-5, rtol=1e-5)
    x3 = torch.randn(1, 3, 24, device=DEVICE)
    assert torch.equal(GEMV_LINEAR(x3, w, b), torch.ops.aten.linear.default(x3, w, b)) and calls == [1]
    # A weight strided along its input features cannot stream rows: aten answers.
    wt = torch.randn(24, 40, device=DEVICE).t()
    assert torch.equal(GEMV_LINEAR(x1, wt, None), torch.ops.aten.linear.default(x1, wt, None)) and calls == [1]


def test_gemv_refuses_more_than_one_row():
    x, w, _ = _data(8, 16, torch.float32, False, lead=(2,))
    with pytest.raises(ValueError, match="one row of 16 features"):
        gemv_module.gemv(x, w, None)


def test_fake_impl_shapes():
    with torch._subclasses.FakeTensorMode():
        out = GEMV_LINEAR(torch.empty(1, 5, 16, dtype=torch.bfloat16), torch.empty(7, 16, dtype=torch.bfloat16), None)
    assert out.shape == (1, 5, 7) and out.dtype == torch.bfloat16


def test_launch_config_gives_every_sm_work_on_the_gpu_shapes():
    # Blocks of output features that leave >= 2 programs per SM where the layer is wide enough (an H200: 132 SMs).
    cfg = gemv_module.launch_config
    assert cfg(5, 7, torch.device("cpu")) == dict(BLOCK_N=8, BLOCK_K=8, num_warps=4, num_stages=3)  # 1 "SM"
    if torch.cuda.is_available():
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for n in (576, 960, 4096, 6144, 28672, 128256):
            block = cfg(n, 4096, torch.device("cuda"))["BLOCK_N"]
            assert -(-n // block) >= 2 * sms or block == 4


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)])
def test_llama_8b_shapes_on_gpu(n, k):
    x, w, _ = _data(n, k, torch.bfloat16, False, lead=(1, 1))
    out = GEMV_LINEAR(x, w, None)
    torch.testing.assert_close(out.float(), torch.nn.functional.linear(x.float(), w.float()), atol=2e-2, rtol=2e-2)


GEMV_SWIGLU = torch.ops.auto_deploy.triton_gemv_swiglu


def _swiglu_ref(x, w, b):
    gate, up = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize(
    "n, k, dtype, bias, atol",
    [(70, 100, torch.float32, False, 1e-5), (64, 1030, torch.float32, True, 1e-5), (33, 48, torch.bfloat16, True, 3e-2)],
)
def test_one_row_swiglu_matches_linear_then_activation(n, k, dtype, bias, atol):
    # A merged [gate; up] weight of 2n rows: n not a multiple of the block (70, 33), K not of the K step (1030).
    x, w, b = _data(2 * n, k, dtype, bias)
    out = gemv_module.gemv_swiglu(x, w, b)
    assert out.shape == (1, n) and out.dtype == dtype
    torch.testing.assert_close(out.float(), _swiglu_ref(x, w, b), atol=atol, rtol=atol)


def test_swiglu_op_takes_the_fused_gemv_for_one_row_and_linear_plus_activation_for_more(monkeypatch):
    x1, w, b = _data(2 * 20, 24, torch.float32, True, lead=(1, 1))
    calls = []
    real = gemv_module.gemv_swiglu
    monkeypatch.setattr(gemv_module, "gemv_swiglu", lambda *a: calls.append(1) or real(*a))
    out = GEMV_SWIGLU(x1, w, b)
    assert calls == [1] and out.shape == (1, 1, 20)
    torch.testing.assert_close(out, _swiglu_ref(x1, w, b), atol=1e-5, rtol=1e-5)
    x3 = torch.randn(2, 3, 24, device=DEVICE)
    out3 = GEMV_SWIGLU(x3, w, b)
    assert calls == [1] and out3.shape == (2, 3, 20)
    torch.testing.assert_close(out3, _swiglu_ref(x3, w, b), atol=1e-5, rtol=1e-5)


def test_silu_mul_rows_and_odd_width():
    gu = torch.randn(5, 2 * 1500, device=DEVICE)
    gate, up = gu.chunk(2, dim=-1)
    torch.testing.assert_close(gemv_module.silu_mul(gu), torch.nn.functional.silu(gate) * up, atol=1e-5, rtol=1e-5)
    assert gemv_module.silu_mul(gu[:0]).shape == (0, 1500)


def test_swiglu_refuses_an_odd_merged_weight():
    x, w, _ = _data(7, 16, torch.float32, False)
    with pytest.raises(ValueError, match="even rows, got 7"):
        gemv_module.gemv_swiglu(x, w, None)


def test_swiglu_fake_impl_shapes():
    with torch._subclasses.FakeTensorMode():
        out = GEMV_SWIGLU(torch.empty(1, 5, 16, dtype=torch.bfloat16), torch.empty(14, 16, dtype=torch.bfloat16), None)
    assert out.shape == (1, 5, 7) and out.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", [(14336, 4096), (1536, 576)])
def test_swiglu_llama_8b_and_smollm2_shapes_on_gpu(n, k):
    x, w, _ = _data(2 * n, k, torch.bfloat16, False, lead=(1, 1))
    out = GEMV_SWIGLU(x, w, None)
    torch.testing.assert_close(out.float(), _swiglu_ref(x, w, None), atol=3e-2, rtol=3e-2)


ADD_RMSNORM_GEMV = torch.ops.auto_deploy.triton_add_rmsnorm_gemv
ADD_RMSNORM = torch.ops.auto_deploy.triton_fused_add_rmsnorm


@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize(
    "n, k, dtype, bias, norm_dtype",
    # K wider than one 512-wide K step and not a power of two (1030), N not a multiple of the block of outputs.
    [(70, 100, torch.float32, False, torch.float32), (64, 1030, torch.float32, True, torch.float32),
     (34, 48, torch.bfloat16, True, torch.bfloat16), (130, 96, torch.float16, False, torch.float16)],
)
def test_add_rmsnorm_gemv_is_the_norm_kernel_then_the_gemv(n, k, dtype, bias, norm_dtype, swiglu):
    x, w, b = _data(n, k, dtype, bias)
    g = torch.Generator().manual_seed(7)
    residual = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    norm_w = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, norm_dtype)
    y, summed = gemv_module.add_rmsnorm_gemv(x, residual, norm_w, 1e-5, w, b, swiglu)
    normed, ref_sum = ADD_RMSNORM(x, residual, norm_w, 1e-5)
    ref = (gemv_module.gemv_swiglu if swiglu else gemv_module.gemv)(normed, w, b)
    # Same roundings in the same places: the sum exactly, the product to the GEMV's own fp32 summation.
    assert torch.equal(summed, ref_sum) and y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_add_rmsnorm_gemv_op_takes_one_launch_for_one_row_and_the_two_kernels_for_more(monkeypatch):
    x1, w, b = _data(40, 24, torch.float32, True, lead=(1, 1))
    residual, norm_w = torch.randn_like(x1), torch.rand(24, device=DEVICE) + 0.5
    calls = []
    real = gemv_module.add_rmsnorm_gemv
    monkeypatch.setattr(gemv_module, "add_rmsnorm_gemv", lambda *a: calls.append(1) or real(*a))
    for rows in (1, 3):
        x, r = torch.randn(1, rows, 24, device=DEVICE), torch.randn(1, rows, 24, device=DEVICE)
        y, summed = ADD_RMSNORM_GEMV(x, r, norm_w, 1e-6, w, b, False)
        normed, ref_sum = ADD_RMSNORM(x, r, norm_w, 1e-6)
        torch.testing.assert_close(y, torch.nn.functional.linear(normed, w, b), atol=1e-5, rtol=1e-5)
        assert torch.equal(summed, ref_sum) and y.shape == (1, rows, 40)
    assert calls == [1]


def test_add_rmsnorm_gemv_refuses_a_norm_in_another_dtype_than_the_weight():
    x, w, _ = _data(8, 16, torch.bfloat16, False)
    with pytest.raises(ValueError, match="the norm gives torch.float32, the linear's weight is torch.bfloat16"):
        gemv_module.add_rmsnorm_gemv(x, torch.randn_like(x), torch.ones(16, device=DEVICE), 1e-6, w, None, False)


@pytest.mark.gpu
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("n, k", [(6144, 4096), (28672, 4096), (960, 576), (3072, 576)])
def test_add_rmsnorm_gemv_llama_8b_and_smollm2_shapes_on_gpu(n, k, swiglu):
    x, w, _ = _data(n, k, torch.bfloat16, False, lead=(1, 1))
    residual = torch.randn_like(x) * 4
    norm_w = torch.rand(k, device=DEVICE, dtype=torch.bfloat16) + 0.5
    y, summed = ADD_RMSNORM_GEMV(x, residual, norm_w, 1e-5, w, None, swiglu)
    normed, ref_sum = ADD_RMSNORM(x, residual, norm_w, 1e-5)
    ref = (GEMV_SWIGLU if swiglu else GEMV_LINEAR)(normed, w, None)
    assert torch.equal(summed, ref_sum)
    torch.testing.assert_close(y, ref, atol=1e-2, rtol=1e-2)
