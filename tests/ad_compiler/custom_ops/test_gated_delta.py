"""torch_gated_delta_rule against transformers' own gated delta rule (chunked and recurrent), state carry-over
across our chunks and across calls, one-token steps."""

import importlib

import pytest
import torch
from ad_compiler.custom_ops.gated_delta import gated_delta_scan

hf = importlib.import_module("transformers.models.qwen3_next.modeling_qwen3_next")


def _inputs(b=2, s=11, h=4, dk=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, s, h, dk, generator=g), torch.randn(b, s, h, dk, generator=g)
    v = torch.randn(b, s, h, dv, generator=g)
    decay = -torch.rand(b, s, h, generator=g) * 2  # log decay <= 0, strong enough to underflow across a chunk
    beta = torch.rand(b, s, h, generator=g)
    return q, k, v, decay, beta


@pytest.mark.parametrize("l2norm", [True, False])
def test_matches_transformers_recurrent_and_chunked(l2norm):
    q, k, v, decay, beta = _inputs()
    ours = torch.ops.auto_deploy.torch_gated_delta_rule(q, k, v, decay, beta, l2norm)
    rec, _ = hf.torch_recurrent_gated_delta_rule(q, k, v, g=decay, beta=beta, use_qk_l2norm_in_kernel=l2norm)
    chunked, _ = hf.torch_chunk_gated_delta_rule(q, k, v, g=decay, beta=beta, chunk_size=4,
                                                 use_qk_l2norm_in_kernel=l2norm)
    torch.testing.assert_close(ours, rec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, chunked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [4, 64])  # several chunks per scan, or one
def test_split_scan_continues_from_state_and_matches_final_state(chunk, monkeypatch):
    from ad_compiler.custom_ops import gated_delta

    monkeypatch.setattr(gated_delta, "CHUNK", chunk)
    q, k, v, decay, beta = _inputs(s=9)
    whole, final = gated_delta_scan(q, k, v, decay, beta)
    first, mid = gated_delta_scan(q[:, :5], k[:, :5], v[:, :5], decay[:, :5], beta[:, :5])
    second, end = gated_delta_scan(q[:, 5:], k[:, 5:], v[:, 5:], decay[:, 5:], beta[:, 5:], mid)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    torch.testing.assert_close(end, final)
    _, hf_final = hf.torch_recurrent_gated_delta_rule(q, k, v, g=decay, beta=beta, output_final_state=True,
                                                     use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(final, hf_final, rtol=1e-5, atol=1e-5)


def test_dtype_fake_and_opcheck():
    q, k, v, decay, beta = (t.to(torch.bfloat16) for t in _inputs(s=5))
    out = torch.ops.auto_deploy.torch_gated_delta_rule(q, k, v, decay, beta, True)
    assert out.dtype == torch.bfloat16 and out.shape == v.shape
    torch.library.opcheck(torch.ops.auto_deploy.torch_gated_delta_rule, _inputs(s=4) + (True,),
                          test_utils=("test_schema", "test_faketensor"))


def test_one_token_steps_equal_the_scan():
    q, k, v, decay, beta = _inputs(s=6)
    whole, final = gated_delta_scan(q, k, v, decay, beta)
    state, outs = None, []
    for t in range(6):
        o, state = gated_delta_scan(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], decay[:, t : t + 1],
                                    beta[:, t : t + 1], state)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, final, rtol=1e-5, atol=1e-5)
