"""decode_attention with RoPE and the K/V write inside (one launch) against rope_and_write_paged_kv + decode_attention."""

import pytest
import torch
from ad_runtime.kernels.triton import paged_decode as pd
from ad_runtime.kernels.triton import paged_kv_write as kv
from ad_runtime.kernels.triton.rope_kv_write import rope_and_write_paged_kv
from paged_attention_ref import make_paged_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(ctx_lens, n_heads, n_kv, head_dim, page_size, dtype, table_dtype, num_splits, min_keys, **opts):
    b = make_paged_batch([1] * len(ctx_lens), ctx_lens, n_heads, n_kv, head_dim, page_size, dtype=dtype,
                         device=DEVICE)
    g = torch.Generator().manual_seed(3)
    table = torch.randn(64 + max(ctx_lens), head_dim, generator=g).to(DEVICE, table_dtype)
    # Positions apart from the cache index (as with a position offset), each row its own.
    pos = (b.input_pos + torch.arange(len(ctx_lens), device=DEVICE, dtype=torch.int32) * 7).to(torch.int64)
    slots = kv.slot_mapping_for(b.cu_seqlen, b.input_pos, b.page_table, page_size, b.q.shape[0])
    launch = pd.DecodeLaunch(min_keys=min_keys)
    ref_kc, ref_vc = b.k_cache.clone(), b.v_cache.clone()
    q_rot = rope_and_write_paged_kv(b.q, b.k, b.v, ref_kc, ref_vc, slots, pos, table)
    ref = pd.decode_attention(q_rot, ref_kc, ref_vc, b.seq_len, b.input_pos, b.page_table, num_splits=num_splits,
                              launch=launch, **opts)
    out = pd.decode_attention(b.q, b.k_cache, b.v_cache, b.seq_len, b.input_pos, b.page_table, num_splits=num_splits,
                              launch=launch, rope=pd.NewKeysWithRope(b.k, b.v, slots, pos, table), **opts)
    # The same rotation and roundings: the caches equal bit for bit (untouched slots too), the outputs too.
    assert torch.equal(b.k_cache, ref_kc) and torch.equal(b.v_cache, ref_vc)
    assert out.dtype == ref.dtype == q_rot.dtype
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("min_keys", [0, 64])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_splits_and_short_contexts(num_splits, min_keys):
    # Contexts 0..150 with pages of 4: the new key lands in the first, a middle or the last split, some splits are
    # empty; with min_keys 0 every split of the grid takes part.
    _check([0, 5, 17, 40, 150], 4, 2, 16, 4, torch.float32, torch.float32, num_splits, min_keys)


@pytest.mark.parametrize("kw", [{"sliding_window": 5}, {"logit_cap": 1.5, "scale": 0.2}])
def test_window_and_cap(kw):
    _check([9, 30, 2], 4, 2, 16, 4, torch.float32, torch.float32, 2, 64, **kw)


def test_bf16_heads_not_a_power_of_two_and_an_fp32_table():
    # head_dim 24 in a block of 32; an fp32 cos/sin table makes the rotated queries (and the output) fp32.
    _check([3, 9], 6, 2, 24, 8, torch.bfloat16, torch.float32, 2, 64)
    _check([3, 9], 6, 2, 24, 8, torch.bfloat16, torch.bfloat16, 1, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 32])
def test_llama_8b_heads_bf16_on_gpu(rows):
    ctx = [1061 + 37 * i for i in range(rows)]
    _check(ctx, 32, 8, 128, 64, torch.bfloat16, torch.bfloat16, pd.default_splits(rows, 8, 2048, torch.device("cuda")),
           64)
