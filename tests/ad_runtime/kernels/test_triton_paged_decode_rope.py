"""decode_attention with RoPE and the K/V write inside (one launch) against rope_and_write_paged_kv, then
decode_attention."""

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
    # Positions apart from the cache index (as with a position offset), each row its own; the table covers them all.
    pos = (b.input_pos + torch.arange(len(ctx_lens), device=DEVICE, dtype=torch.int32) * 7).to(torch.int64)
    table = torch.randn(int(pos.max()) + 1, head_dim, generator=g).to(DEVICE, table_dtype)
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


@pytest.mark.parametrize("rows", [3, 9])
def test_cached_attention_op_takes_the_fused_path_from_min_rows_and_gives_the_same(rows, monkeypatch):
    """The triton attention op on a decode-only step with RoPE: RoPE inside the decode kernel (from
    ROPE_IN_DECODE_MIN_ROWS rows) and the separate rope + K/V write launch leave the same caches and outputs."""
    from ad_runtime.attention import AttentionRegistry
    from ad_runtime.attention import triton_backend
    from ad_runtime.kv_cache.page_pool import PagePool
    from ad_runtime.kv_cache.sequence_info import SequenceInfo

    n_heads, n_kv, head_dim, page = 4, 2, 16, 4
    g = torch.Generator().manual_seed(5)
    ctx = [int(c) for c in torch.randint(0, 30, (rows,), generator=g)]
    pool = PagePool(64, page)
    info = SequenceInfo(max_batch_size=rows, max_seq_len=64, page_size=page, max_num_tokens=64, device=DEVICE)
    info.scratch_page = 64
    for i, c in enumerate(ctx):
        pool.ensure_capacity(i, c + 1)
    info.nest_sequences([[0]] * rows, ctx, [pool.page_table(i) for i in range(rows)])
    desc = AttentionRegistry.get("triton")
    desc.host_prepare(info)
    named = info.args()
    meta = [named[name] for name in desc.metadata_names()]
    assert meta[0].tolist() == [0, 0, rows]  # batch_info_host: a decode-only step
    q, k, v = (torch.randn(1, rows, n, head_dim, generator=g).to(DEVICE) for n in (n_heads, n_kv, n_kv))
    table = torch.randn(80, head_dim, generator=g).to(DEVICE)
    pos = (torch.tensor(ctx) + 3).to(DEVICE).view(1, rows)
    caches = (torch.randn(65, page, n_kv, head_dim, generator=g) * 10).to(DEVICE)
    got = {}
    for fused in (True, False):
        monkeypatch.setattr(triton_backend, "ROPE_IN_DECODE_MIN_ROWS", 1 if fused else 10**9)
        kc, vc = caches.clone(), caches.clone() + 1
        calls = []
        real = pd.decode_attention
        monkeypatch.setattr(pd, "decode_attention", lambda *a, **kw: calls.append(kw.get("rope")) or real(*a, **kw))
        out = torch.ops.auto_deploy.triton_cached_attention(q, k, v, *meta, kc, vc, None, None, None, None, table, pos)
        monkeypatch.setattr(pd, "decode_attention", real)
        assert (calls[0] is not None) == fused
        got[fused] = (out, kc, vc)
    for a, b in zip(got[True], got[False]):
        assert torch.equal(a, b)
