"""The skinny Triton GEMM (8-64 rows against a large weight) and its place in auto_deploy::triton_gemv_linear."""

import ad_runtime.kernels  # noqa: F401 - registers triton_gemv_linear
import pytest
import torch
from ad_runtime.kernels.triton import skinny_gemm as skinny

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEMV_LINEAR = torch.ops.auto_deploy.triton_gemv_linear
GEMV_SWIGLU = torch.ops.auto_deploy.triton_gemv_swiglu


def _data(m: int, n: int, k: int, dtype: torch.dtype, bias: bool):
    g = torch.Generator().manual_seed(m * 7 + n * 31 + k)
    x = torch.randn(1, m, k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("m", [3, 8, 20])
@pytest.mark.parametrize("n, k, bias", [(70, 100, False), (130, 300, True)])
def test_matches_linear(m, n, k, bias):
    # Rows padded to the 16-row tile, N not a multiple of the output block, K not of the K step.
    x, w, b = _data(m, n, k, torch.float32, bias)
    out = skinny.skinny_gemm(x, w, b)
    assert out.shape == (1, m, n)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4)


def test_strided_rows_are_read_as_given():
    x, w, _ = _data(12, 40, 64, torch.float32, False)
    xs = torch.randn(12, 128, device=DEVICE)[:, ::2]  # a view with stride 2 along the features
    torch.testing.assert_close(skinny.skinny_gemm(xs, w, None), xs @ w.t(), atol=1e-4, rtol=1e-4)


def test_takes_the_measured_rows_and_large_16_bit_weights():
    big = torch.empty(4096, 14336, dtype=torch.bfloat16, device="meta")
    assert skinny.takes(8, big) and skinny.takes(64, big)
    assert not skinny.takes(7, big) and not skinny.takes(65, big)
    assert not skinny.takes(32, torch.empty(6144, 4096, dtype=torch.bfloat16, device="meta"))  # qkv: cuBLAS
    assert not skinny.takes(32, torch.empty(4096, 14336, dtype=torch.float32, device="meta"))
    assert not skinny.takes(32, big.t())
    assert skinny.launch_config(14336)["BLOCK_K"] == 256 and skinny.launch_config(4096)["BLOCK_N"] == 64


def test_ops_send_a_few_rows_with_a_large_weight_to_it(monkeypatch):
    monkeypatch.setattr(skinny, "MIN_WEIGHTS", 1)  # small weights stand for large ones on the interpreter
    calls = []
    real = skinny.skinny_gemm
    monkeypatch.setattr(skinny, "skinny_gemm", lambda *a: calls.append(a[0].shape) or real(*a))
    x, w, b = _data(8, 48, 32, torch.float16, True)
    out = GEMV_LINEAR(x, w, b)
    torch.testing.assert_close(out.float(), torch.nn.functional.linear(x.float(), w.float(), b.float()),
                               atol=2e-3, rtol=2e-3)
    gate, up = torch.nn.functional.linear(x.float(), w.float(), b.float()).to(x.dtype).float().chunk(2, dim=-1)
    torch.testing.assert_close(GEMV_SWIGLU(x, w, b).float(), torch.nn.functional.silu(gate) * up, atol=3e-3, rtol=3e-3)
    assert len(calls) == 2
    x4 = x[:, :4]
    assert torch.equal(GEMV_LINEAR(x4, w, b), torch.ops.aten.linear.default(x4, w, b)) and len(calls) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("m", [8, 32, 64])
@pytest.mark.parametrize("n, k", [(28672, 4096), (4096, 14336), (128256, 4096)])
def test_llama_8b_shapes_on_gpu(m, n, k):
    x, w, _ = _data(m, n, k, torch.bfloat16, False)
    assert skinny.takes(m, w)
    out = GEMV_LINEAR(x, w, None)
    torch.testing.assert_close(out.float(), torch.nn.functional.linear(x.float(), w.float()), atol=2e-2, rtol=2e-2)
