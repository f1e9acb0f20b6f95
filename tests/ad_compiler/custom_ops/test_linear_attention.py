"""torch_linear_attention against the plain per-token recurrence and MiniMax's own lightning layer; state carry-over."""

import pytest
import torch
from ad_compiler.custom_ops import linear_attention
from ad_compiler.custom_ops.linear_attention import linear_attention_scan


def _inputs(b=2, s=11, h=3, dk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, s, h, dk, generator=g), torch.randn(b, s, h, dk, generator=g)
    v = torch.randn(b, s, h, dv, generator=g)
    return q, k, v, -torch.rand(b, s, h, generator=g) * 2


def _recurrence(q, k, v, g, S=None):
    b, s, h, dk = k.shape
    S = torch.zeros(b, h, dk, v.shape[-1]) if S is None else S.clone()
    outs = []
    for t in range(s):
        S = S * g[:, t, :, None, None].exp() + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1), S


@pytest.mark.parametrize("chunk", [4, 64])
def test_matches_the_recurrence_across_chunks_and_calls(chunk, monkeypatch):
    monkeypatch.setattr(linear_attention, "CHUNK", chunk)
    q, k, v, g = _inputs()
    ref, ref_state = _recurrence(q, k, v, g)
    torch.testing.assert_close(torch.ops.auto_deploy.torch_linear_attention(q, k, v, g), ref, rtol=1e-5, atol=1e-5)
    first, mid = linear_attention_scan(q[:, :6], k[:, :6], v[:, :6], g[:, :6])
    second, end = linear_attention_scan(q[:, 6:], k[:, 6:], v[:, 6:], g[:, 6:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(end, ref_state, rtol=1e-5, atol=1e-5)


def test_matches_minimax_lightning_layer():
    """HF's block-wise lightning attention (block 4 over 10 tokens) equals the op with g = -slope per head."""
    import transformers
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    config = transformers.MiniMaxConfig(hidden_size=32, num_attention_heads=4, head_dim=8, num_hidden_layers=2,
                                        block_size=4, layer_types=["linear_attention", "full_attention"])
    torch.manual_seed(0)
    layer = MiniMaxLightningAttention(config, layer_idx=0).eval()
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        ref, _ = layer(x, None, None)
        qkv = layer.act_fn(layer.qkv_proj(x)).reshape(2, 10, 4, 24)
        q, k, v = torch.split(qkv, 8, dim=3)
        g = (-layer.slope_rate.reshape(1, 1, 4)).expand(2, 10, 4)
        out = torch.ops.auto_deploy.torch_linear_attention(q, k, v, g).reshape(2, 10, 32)
        ours = layer.out_proj(torch.sigmoid(layer.output_gate(x)) * layer.norm(out))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_dtype_and_opcheck():
    q, k, v, g = _inputs(s=5)
    out = torch.ops.auto_deploy.torch_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), g)
    assert out.dtype == torch.bfloat16 and out.shape == v.shape
    torch.library.opcheck(torch.ops.auto_deploy.torch_linear_attention, (q, k, v, g),
                          test_utils=("test_schema", "test_faketensor"))
