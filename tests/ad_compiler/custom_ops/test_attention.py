"""torch_attention against naive math and Hugging Face eager attention (GQA, layouts, window, sinks, soft-cap)."""

import math
import types

import pytest
import torch
from conftest import count_calls, export_fn
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

attn = torch.ops.auto_deploy.torch_attention


def naive_attention(q, k, v, causal=True, scale=None, window=None, sinks=None, cap=None, mask=None):
    """Per-query loop over visible keys, bnsd, written independently of the op."""
    b, n, s_q, d = q.shape
    s_k, rep = k.shape[2], n // k.shape[1]
    scale = scale if scale is not None else 1 / math.sqrt(d)
    out = torch.zeros(b, n, s_q, v.shape[-1], dtype=torch.float64)
    for h in range(n):
        kh, vh = k[:, h // rep].double(), v[:, h // rep].double()
        for i in range(s_q):
            pos = i + s_k - s_q
            logits = (q[:, h, i].double()[:, None, :] * kh).sum(-1) * scale  # [b, s_k]
            if cap is not None:
                logits = cap * torch.tanh(logits / cap)
            if mask is not None:
                logits = logits + mask[:, 0, i].double()
            for j in range(s_k):
                if (causal and j > pos) or (window is not None and j <= pos - window):
                    logits[:, j] = -math.inf
            extra = sinks[h].double().expand(b, 1) if sinks is not None else torch.full((b, 1), -math.inf)
            p = torch.softmax(torch.cat([logits, extra.double()], -1), -1)[:, :-1]
            out[:, h, i] = (p[:, :, None] * vh).sum(1)
    return out.float()


def _qkv(b=2, n=4, n_kv=2, s=7, d=8, s_k=None):
    s_k = s_k or s
    return torch.randn(b, n, s, d), torch.randn(b, n_kv, s_k, d), torch.randn(b, n_kv, s_k, d)


@pytest.mark.parametrize("layout", ["bnsd", "bsnd"])
@pytest.mark.parametrize("n_kv", [4, 2, 1])
@pytest.mark.parametrize(
    "feature",
    [
        {},
        {"causal": False},
        {"window": 3},
        {"sinks": True},
        {"cap": 2.0},
        {"window": 2, "sinks": True, "cap": 5.0, "scale": 0.3},
    ],
)
def test_matches_naive(layout, n_kv, feature):
    q, k, v = _qkv(n_kv=n_kv)
    sinks = torch.randn(4) if feature.get("sinks") else None
    causal = feature.get("causal", True)
    kw = dict(
        is_causal=causal,
        scale=feature.get("scale"),
        sinks=sinks,
        sliding_window=feature.get("window"),
        logit_cap=feature.get("cap"),
    )
    expected = naive_attention(
        q, k, v, causal, feature.get("scale"), feature.get("window"), sinks, feature.get("cap")
    )
    if layout == "bsnd":
        out = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bsnd", **kw).transpose(1, 2)
    else:
        out = attn(q, k, v, **kw)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_additive_mask_and_bool_mask():
    q, k, v = _qkv()
    # Key 3 of batch 1 is hidden (every query still sees at least one key, so no row is all -inf).
    pad = torch.zeros(2, 1, 7, 7)
    pad[1, :, :, 3] = -math.inf
    expected = naive_attention(q, k, v, causal=True, mask=pad)
    torch.testing.assert_close(attn(q, k, v, pad, is_causal=True), expected, atol=1e-5, rtol=1e-5)
    causal_bool = torch.ones(7, 7, dtype=torch.bool).tril() & (pad == 0)
    torch.testing.assert_close(attn(q, k, v, causal_bool, is_causal=False), expected, atol=1e-5, rtol=1e-5)


def test_shorter_query_is_bottom_right_aligned():
    q, k, v = _qkv(s=3, s_k=9)
    expected = naive_attention(q, k, v, causal=True, window=4)
    torch.testing.assert_close(attn(q, k, v, sliding_window=4), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(q, k, v), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_value_head_dim_may_differ():
    q, k, _ = _qkv()
    v = torch.randn(2, 2, 7, 5)
    out = attn(q, k, v, sinks=torch.randn(4))
    assert out.shape == (2, 4, 7, 5)
    torch.testing.assert_close(attn(q, k, v), naive_attention(q, k, v), atol=1e-5, rtol=1e-5)


def _causal_window_mask(s: int, window: int | None) -> torch.Tensor:
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = (j <= i) & ((j > i - window) if window else True)
    return torch.zeros(s, s).masked_fill(~allowed, -math.inf)[None, None]


def test_matches_hf_gemma2_softcap_sliding_window():
    q, k, v = _qkv(n=4, n_kv=2, s=9, d=16)
    module = types.SimpleNamespace(num_key_value_groups=2, head_dim=16, training=False)
    expected, _ = gemma2_eager(module, q, k, v, _causal_window_mask(9, 4), scaling=0.25, softcap=3.0)
    out = attn(q, k, v, scale=0.25, sliding_window=4, logit_cap=3.0)
    torch.testing.assert_close(out.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)


def test_matches_hf_gpt_oss_sinks():
    q, k, v = _qkv(n=4, n_kv=1, s=9, d=16)
    sinks = torch.randn(4)
    module = types.SimpleNamespace(num_key_value_groups=4, sinks=sinks, training=False)
    expected, _ = gpt_oss_eager(module, q, k, v, _causal_window_mask(9, 3), scaling=0.25)
    out = attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.25, sinks=sinks,
               sliding_window=3, layout="bsnd")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bf16_keeps_dtype():
    q, k, v = (t.bfloat16() for t in _qkv())
    out = attn(q, k, v, logit_cap=4.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_attention(q.float(), k.float(), v.float(), cap=4.0), atol=3e-2, rtol=3e-2)


def test_bad_layout_and_heads_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="layout"):
        attn(q, k, v, layout="nsbd")
    with pytest.raises(ValueError, match="multiple"):
        attn(q, torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8))


@pytest.mark.parametrize("extra", [{}, {"sliding_window": 3, "logit_cap": 2.0}])
def test_export_keeps_one_node_with_dynamic_shapes(extra):
    dyn = torch.export.Dim.DYNAMIC
    q, k, v = (t.transpose(1, 2) for t in _qkv(s=5))
    shapes = tuple({0: dyn, 1: dyn} for _ in range(3))
    ep = export_fn(lambda q, k, v: attn(q, k, v, layout="bsnd", **extra), (q, k, v), shapes)
    assert count_calls(ep, attn) == 1
    q2, k2, v2 = (t.transpose(1, 2) for t in _qkv(b=3, s=11))
    torch.testing.assert_close(ep.module()(q2, k2, v2), attn(q2, k2, v2, layout="bsnd", **extra))
