"""auto_deploy::triton_fused_add_rmsnorm against the torch backend op and the unfused add + torch_rmsnorm."""

import os

import ad_compiler  # noqa: F401 - registers torch_rmsnorm and torch_fused_add_rmsnorm
import ad_runtime.kernels  # noqa: F401 - registers triton_fused_add_rmsnorm
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ad = torch.ops.auto_deploy


def sum_tol(dtype: torch.dtype) -> dict:
    """Compiled Triton rounds the fp32 sum to nearest-even as torch's add does: equal bit for bit. Triton 3.6's
    CPU interpreter truncates fp32 -> bf16 instead (its cast ignores the rounding mode): up to one bf16 ulp."""
    if dtype == torch.bfloat16 and DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return dict(rtol=2**-7, atol=0)
    return dict(rtol=0, atol=0)


def _inputs(shape, dtype, w_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype)
    r = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype)
    w = (1 + torch.randn(shape[-1], generator=g) * 0.1).to(DEVICE, w_dtype or dtype)
    return x, r, w


@pytest.mark.parametrize(
    "shape, dtype, atol",
    [((3, 5, 64), torch.float32, 1e-5), ((7, 48), torch.bfloat16, 2e-2), ((2, 3, 100), torch.float16, 2e-3)],
)
def test_matches_torch_op(shape, dtype, atol):
    x, r, w = _inputs(shape, dtype)
    out, summed = ad.triton_fused_add_rmsnorm(x, r, w, 1e-6)
    ref_out, ref_sum = ad.torch_fused_add_rmsnorm(x, r, w, 1e-6)
    assert (out.dtype, summed.dtype) == (ref_out.dtype, ref_sum.dtype) == (dtype, dtype)
    assert out.shape == summed.shape == x.shape
    # One rounding of the fp32 sum to the dtype, as torch's add does.
    torch.testing.assert_close(summed, ref_sum, **sum_tol(dtype))
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=atol)
    # and the norm is what the unfused canonical ops give on that sum
    torch.testing.assert_close(out, ad.torch_rmsnorm(x + r, w, 1e-6), atol=atol, rtol=atol)


def test_fp32_weight_promotes_and_strided_inputs():
    x = torch.randn(4, 32, 6, device=DEVICE).transpose(1, 2).to(torch.bfloat16)  # [4, 6, 32], strided rows
    r = torch.randn(4, 6, 64, device=DEVICE)[..., ::2].to(torch.bfloat16)  # last-dim stride 2: copied
    w = torch.randn(32, device=DEVICE)
    out, summed = ad.triton_fused_add_rmsnorm(x, r, w, 1e-5)
    assert out.dtype == torch.float32 and summed.dtype == torch.bfloat16
    torch.testing.assert_close(summed, x + r, **sum_tol(torch.bfloat16))
    # the normalised activations are rounded to bf16 before the fp32 weight multiply: bf16 tolerance
    torch.testing.assert_close(out, ad.torch_rmsnorm(x + r, w, 1e-5), atol=2e-2, rtol=1e-2)


def test_no_rows():
    x, r, w = _inputs((0, 16), torch.float32)
    out, summed = ad.triton_fused_add_rmsnorm(x, r, w, 1e-6)
    assert out.shape == summed.shape == (0, 16)


def test_shapes_must_match():
    x, _, w = _inputs((2, 16), torch.float32)
    with pytest.raises(ValueError, match="one shape"):
        ad.triton_fused_add_rmsnorm(x, x[:1], w, 1e-6)


def test_registered_as_the_triton_add_rmsnorm_backend():
    from ad_compiler.kernels_registry import get_kernel

    assert get_kernel("add_rmsnorm", "triton") is ad.triton_fused_add_rmsnorm.default


def test_fake_impl_shapes():
    with torch._subclasses.FakeTensorMode():
        x = torch.empty(2, 9, 16, dtype=torch.bfloat16)
        out, summed = ad.triton_fused_add_rmsnorm(x, torch.empty_like(x), torch.empty(16), 1e-6)
    assert out.shape == summed.shape == (2, 9, 16)
    assert out.dtype == torch.float32 and summed.dtype == torch.bfloat16


@pytest.mark.gpu
def test_large_hidden_bf16_on_gpu_matches_unfused():
    x = torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    out, summed = ad.triton_fused_add_rmsnorm(x, r, w, 1e-6)
    ref_sum = x + r
    torch.testing.assert_close(summed, ref_sum, rtol=0, atol=0)
    torch.testing.assert_close(out, ad.torch_rmsnorm(ref_sum, w, 1e-6), atol=2e-2, rtol=2e-2)
