"""decode_attention with RoPE and the K/V write in its launch (RopeWrite) against rope_kv_write + decode_attention."""

import pytest
import torch
from ad_runtime.kernels.triton import paged_decode as pd
from ad_runtime.kernels.triton import paged_kv_write as kv
from ad_runtime.kernels.triton.rope_kv_write import rope_and_write_paged_kv
from paged_attention_ref import make_paged_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _compare(ctx_lens, n_heads, n_kv, head_dim, page_size, dtype=torch.float32, device=DEVICE, tol=1e-5, **kw):
    b = make_paged_batch([1] * len(ctx_lens), ctx_lens, n_heads, n_kv, head_dim, page_size, dtype, device)
    slots = kv.slot_mapping_for(b.cu_seqlen, b.input_pos, b.page_table, page_size, b.q.shape[0])
    pos = b.input_pos.to(torch.int64)  # a decode token sits at its sequence's cached length
    table = torch.randn(max(ctx_lens) + 8, head_dim, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    ref_k, ref_v = b.k_cache.clone(), b.v_cache.clone()
    q_rot = rope_and_write_paged_kv(b.q, b.k, b.v, ref_k, ref_v, slots, pos, table)
    args = (b.seq_len, b.input_pos, b.page_table)
    want = pd.decode_attention(q_rot, ref_k, ref_v, *args, **kw)
    got = pd.decode_attention(b.q, b.k_cache, b.v_cache, *args, rope=pd.RopeWrite(b.k, b.v, slots, pos, table), **kw)
    assert got.dtype == want.dtype and got.shape == want.shape
    # The caches hold the same rotated keys and values, and nothing else moved.
    torch.testing.assert_close(b.k_cache, ref_k, atol=tol, rtol=tol)
    assert torch.equal(b.v_cache, ref_v)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    return got


@pytest.mark.parametrize("min_keys", [0, 64])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_same_output_and_cache_as_two_launches(num_splits, min_keys):
    # contexts 0..150 with pages of 4: the newest key lands in the first, a middle or the last split, on a page
    # boundary or inside a page; with min_keys 0 some splits are empty and the writer is not the last split
    _compare([0, 5, 17, 40, 150], 4, 2, 16, 4, num_splits=num_splits, launch=pd.DecodeLaunch(min_keys=min_keys))


@pytest.mark.parametrize("kw", [{"sliding_window": 5}, {"logit_cap": 1.5, "scale": 0.2}, {"sinks": True}])
def test_options(kw):
    if kw.get("sinks"):
        kw = {"sinks": torch.randn(4, generator=torch.Generator().manual_seed(1)).to(DEVICE)}
    _compare([3, 15, 2, 40], 4, 2, 16, 4, num_splits=2, **kw)


def test_mqa_and_bf16():
    _compare([9, 0, 33], 6, 1, 16, 8, dtype=torch.bfloat16, tol=2e-2)


@pytest.mark.gpu
def test_llama_8b_heads_bf16_on_gpu():
    _compare([1000, 37, 513, 0, 1], 32, 8, 128, 16, dtype=torch.bfloat16, device="cuda", tol=2e-2)
