"""torch_rmsnorm against transformers' LlamaRMSNorm in fp32 and bf16, and export as one node."""

import pytest
import torch
from conftest import count_calls, export_fn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

rmsnorm = torch.ops.auto_deploy.torch_rmsnorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_llama_rmsnorm(dtype):
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = (torch.randn(2, 7, 64) * 3).to(dtype)
    out = rmsnorm(x, norm.weight, 1e-5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, norm(x), atol=0, rtol=0)


def test_eps_is_used():
    x, w = torch.full((1, 4), 1e-3), torch.ones(4)
    assert not torch.allclose(rmsnorm(x, w, 1e-6), rmsnorm(x, w, 1.0))


def test_export_one_node_dynamic():
    dyn = torch.export.Dim.DYNAMIC
    w = torch.randn(64)
    ep = export_fn(lambda x: rmsnorm(x, w, 1e-6), (torch.randn(2, 5, 64),), ({0: dyn, 1: dyn},))
    assert count_calls(ep, rmsnorm) == 1
    x = torch.randn(3, 11, 64)
    torch.testing.assert_close(ep.module()(x), rmsnorm(x, w, 1e-6))
