"""auto_deploy::triton_rmsnorm against the canonical torch_rmsnorm (HF semantics)."""

import ad_compiler.custom_ops  # noqa: F401 - registers torch_rmsnorm
import ad_runtime.kernels  # noqa: F401 - registers triton_rmsnorm
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "shape, dtype, atol",
    [((3, 5, 64), torch.float32, 1e-5), ((7, 48), torch.bfloat16, 2e-2), ((2, 3, 100), torch.float16, 2e-3)],
)
def test_matches_torch_rmsnorm(shape, dtype, atol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 3).to(DEVICE, dtype)
    w = (1 + torch.randn(shape[-1], generator=g) * 0.1).to(DEVICE, dtype)
    out = torch.ops.auto_deploy.triton_rmsnorm(x, w, 1e-6)
    ref = torch.ops.auto_deploy.torch_rmsnorm(x, w, 1e-6)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)


def test_fp32_weight_promotes_and_non_contiguous_input():
    x = torch.randn(4, 32, 6, device=DEVICE).transpose(1, 2).to(torch.bfloat16)  # [4, 6, 32], strided
    w = torch.randn(32, device=DEVICE)
    out = torch.ops.auto_deploy.triton_rmsnorm(x, w, 1e-5)
    assert out.dtype == torch.float32
    # the normalised activations are rounded to bf16 before the fp32 weight multiply: bf16 tolerance
    torch.testing.assert_close(out, torch.ops.auto_deploy.torch_rmsnorm(x, w, 1e-5), atol=2e-2, rtol=1e-2)


def test_fake_impl_shapes():
    with torch._subclasses.FakeTensorMode():
        x = torch.empty(2, 9, 16, dtype=torch.bfloat16)
        out = torch.ops.auto_deploy.triton_rmsnorm(x, torch.empty(16, dtype=torch.bfloat16), 1e-6)
    assert out.shape == (2, 9, 16) and out.dtype == torch.bfloat16


@pytest.mark.gpu
def test_large_hidden_bf16_on_gpu():
    x = torch.randn(33, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(torch.ops.auto_deploy.triton_rmsnorm(x, w, 1e-6),
                               torch.ops.auto_deploy.torch_rmsnorm(x, w, 1e-6), atol=2e-2, rtol=2e-2)
