"""RoPE ops against transformers' Llama, DeepSeek-V3 and Llama-4 rotary functions, both layouts, and export."""

import pytest
import torch
from conftest import count_calls, export_fn
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from transformers.models.llama4.modeling_llama4 import apply_rotary_emb

ops = torch.ops.auto_deploy


def _cos_sin(b: int, s: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    pos = torch.randint(0, 100, (b, s)).float()
    freqs = pos[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("layout", ["bnsd", "bsnd"])
def test_explicit_cos_sin_matches_hf(layout):
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 5, 16)
    cos, sin = _cos_sin(2, 5, 16)
    eq, ek = apply_rotary_pos_emb(q, k, cos, sin)
    if layout == "bsnd":
        oq, ok = ops.torch_rope_with_explicit_cos_sin(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2)
        oq, ok = oq.transpose(1, 2), ok.transpose(1, 2)
    else:
        oq, ok = ops.torch_rope_with_explicit_cos_sin(q, k, cos, sin, 1)
    torch.testing.assert_close(oq, eq)
    torch.testing.assert_close(ok, ek)


@pytest.mark.parametrize("layout", ["bnsd", "bsnd"])
def test_qk_interleaving_matches_deepseek(layout):
    q, k = torch.randn(2, 4, 5, 16), torch.randn(2, 1, 5, 16)
    cos, sin = _cos_sin(2, 5, 16)
    eq, ek = apply_rotary_pos_emb_interleave(q, k, cos, sin)
    if layout == "bsnd":
        oq, ok = ops.torch_rope_with_qk_interleaving(q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2)
        oq, ok = oq.transpose(1, 2), ok.transpose(1, 2)
    else:
        oq, ok = ops.torch_rope_with_qk_interleaving(q, k, cos, sin, 1)
    torch.testing.assert_close(oq, eq)
    torch.testing.assert_close(ok, ek)
    # It is not the plain rotate_half rope: the pairs really are interleaved.
    assert not torch.allclose(oq, apply_rotary_pos_emb(q, k, cos, sin)[0])


def test_complex_freqs_matches_llama4():
    xq, xk = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    angles = torch.randn(2, 5, 8)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    eq, ek = apply_rotary_emb(xq, xk, freqs_cis)
    oq, ok = ops.torch_rope_with_complex_freqs(xq, xk, freqs_cis, 2)
    torch.testing.assert_close(oq, eq)
    torch.testing.assert_close(ok, ek)
    # bnsd: unsqueeze at 1 gives the same rotation on transposed inputs.
    bq, bk = ops.torch_rope_with_complex_freqs(xq.transpose(1, 2), xk.transpose(1, 2), freqs_cis, 1)
    torch.testing.assert_close(bq.transpose(1, 2), eq)
    torch.testing.assert_close(bk.transpose(1, 2), ek)


def test_bf16_inputs_keep_dtype_for_complex():
    xq = torch.randn(1, 3, 2, 8, dtype=torch.bfloat16)
    freqs = torch.polar(torch.ones(1, 3, 4), torch.randn(1, 3, 4))
    oq, ok = ops.torch_rope_with_complex_freqs(xq, xq, freqs, 2)
    assert oq.dtype == ok.dtype == torch.bfloat16


@pytest.mark.parametrize("op_name", ["torch_rope_with_explicit_cos_sin", "torch_rope_with_qk_interleaving"])
def test_cos_sin_ops_export_as_one_node(op_name):
    op = getattr(ops, op_name)
    dyn = torch.export.Dim.DYNAMIC
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    cos, sin = _cos_sin(2, 5, 16)
    shapes = tuple({0: dyn, 1: dyn} for _ in range(4))
    ep = export_fn(lambda q, k, c, s: op(q, k, c, s, 2), (q, k, cos, sin), shapes)
    assert count_calls(ep, op) == 1
    q2, k2 = torch.randn(3, 9, 4, 16), torch.randn(3, 9, 2, 16)
    c2, s2 = _cos_sin(3, 9, 16)
    for got, want in zip(ep.module()(q2, k2, c2, s2), op(q2, k2, c2, s2, 2)):
        torch.testing.assert_close(got, want)


def test_complex_op_exports_as_one_node():
    op = ops.torch_rope_with_complex_freqs
    dyn = torch.export.Dim.DYNAMIC
    xq, xk = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    freqs = torch.polar(torch.ones(2, 5, 8), torch.randn(2, 5, 8))
    ep = export_fn(lambda a, b, f: op(a, b, f, 2), (xq, xk, freqs), tuple({0: dyn, 1: dyn} for _ in range(3)))
    assert count_calls(ep, op) == 1
