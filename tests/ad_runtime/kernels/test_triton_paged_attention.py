"""Triton paged-attention kernels against a dense torch reference on small shapes."""

import pytest
import torch
from ad_runtime.kernels.triton import paged_attention as pa
from ad_runtime.kernels.triton import paged_decode as pd
from ad_runtime.kernels.triton import paged_kv_write as kv
from paged_attention_ref import cache_contents, make_paged_batch, reference_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _write(batch, page_size: int) -> None:
    slots = kv.slot_mapping_for(batch.cu_seqlen, batch.input_pos, batch.page_table, page_size, batch.q.shape[0])
    kv.write_paged_kv(batch.k, batch.v, batch.k_cache, batch.v_cache, slots)


def test_write_fills_exactly_the_new_slots():
    # pages of 4: sequences cross page boundaries and start mid-page (context 3, 7)
    b = make_paged_batch([5, 9, 1], [3, 0, 7], n_heads=2, n_kv=2, head_dim=8, page_size=4, device=DEVICE)
    before_k = b.k_cache.clone()
    _write(b, 4)
    cu = b.cu_seqlen.tolist()
    touched = torch.zeros(b.k_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    for i in range(3):
        ctx, new = int(b.input_pos[i]), cu[i + 1] - cu[i]
        kk, vv = cache_contents(b, i, ctx + new)
        assert torch.equal(kk, torch.cat([b.ctx_k[i], b.k[cu[i] : cu[i + 1]]]))
        assert torch.equal(vv, torch.cat([b.ctx_v[i], b.v[cu[i] : cu[i + 1]]]))
        for p in range(ctx, ctx + new):
            touched[b.page_table[i, p // 4], p % 4] = True
    # nothing else was written
    assert torch.equal(b.k_cache[~touched], before_k[~touched])


@pytest.mark.parametrize(
    "seq_lens, ctx_lens, n_heads, n_kv",
    [
        ([6, 9], [0, 0], 4, 4),  # plain prefill, MHA
        ([5, 3], [6, 11], 4, 2),  # chunked prefill over cached context, GQA
        ([20], [13], 6, 1),  # several key blocks and pages, MQA
    ],
)
def test_context_attention(seq_lens, ctx_lens, n_heads, n_kv):
    b = make_paged_batch(seq_lens, ctx_lens, n_heads, n_kv, head_dim=16, page_size=4, device=DEVICE)
    _write(b, 4)
    out = pa.context_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlen, b.input_pos, b.page_table)
    torch.testing.assert_close(out, reference_attention(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("split_full", [True, False])
@pytest.mark.parametrize("kw", [{}, {"sliding_window": 7}, {"logit_cap": 2.0}])
def test_context_key_blocks_before_the_diagonal(split_full, kw):
    # Query and key blocks of 16 over 37 cached keys: every query block has whole key blocks before its first
    # query (run without a mask when split_full and no window) and masked ones on its diagonal.
    b = make_paged_batch([45, 20], [37, 0], 4, 2, head_dim=16, page_size=4, device=DEVICE)
    _write(b, 4)
    launch = pa.PrefillLaunch(16, 16, 4, 3, split_full)
    out = pa.context_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlen, b.input_pos, b.page_table, launch=launch,
                               **kw)
    torch.testing.assert_close(out, reference_attention(b, **kw), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_heads, block_m", [(8, 64), (6, 64), (4, 32), (4, 16)])
@pytest.mark.parametrize("kw", [{}, {"sliding_window": 7}, {"logit_cap": 2.0}, {"sinks": True}])
def test_context_packs_query_heads_of_a_kv_head(n_heads, block_m, kw):
    # Tiles of block_m // group positions x the group's heads: groups of 4 (8 / 2), of 2, of 3 with idle rows (6 / 2:
    # 21 positions, 63 of 64 rows), and of 2 that a 16-row tile cannot pack (the unpacked kernel runs).
    b = make_paged_batch([45, 20, 3], [37, 0, 5], n_heads, 2, head_dim=16, page_size=4, device=DEVICE)
    _write(b, 4)
    if kw.get("sinks"):
        kw = {"sinks": torch.randn(n_heads, device=DEVICE)}
    launch = pa.PrefillLaunch(block_m, 16, 4, 3, True, pack_gqa=True)
    assert pa.packs_gqa(launch, n_heads // 2) == (block_m > 16)
    out = pa.context_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlen, b.input_pos, b.page_table, launch=launch,
                               **kw)
    torch.testing.assert_close(out, reference_attention(b, **kw), atol=1e-4, rtol=1e-4)


def test_prefill_tiles_by_chunk_dtype_and_shared_memory():
    assert pa.prefill_launch(8, 128) == pa.PrefillLaunch(16, 32, 4, 3)
    assert pa.prefill_launch(256, 128) == pa.PrefillLaunch(64, 32, 4, 3)
    assert pa.prefill_launch(1024, 128) == pa.PrefillLaunch(64, 64, 4, 2)
    assert pa.prefill_launch(8192, 128, smem_limit=227 * 1024) == pa.PrefillLaunch(128, 128, 8, 2)  # Hopper
    # 128 x 128 tiles need 160 KiB: not on a GPU with 163 KiB (A100) or 99 KiB a block; fp32 and wide heads neither
    assert pa.prefill_launch(8192, 128, smem_limit=163 * 1024) == pa.PrefillLaunch(64, 32, 4, 3)
    assert pa.prefill_launch(1024, 128, smem_limit=99 * 1024) == pa.PrefillLaunch(64, 32, 4, 3)
    assert pa.prefill_launch(8192, 128, elem_size=4) == pa.PrefillLaunch(64, 32, 4, 3)
    assert pa.prefill_launch(8192, 256) == pa.PrefillLaunch(64, 32, 4, 3)
    # Groups of query heads per KV head that a 128-row tile holds are packed into it (Llama-3.1-8B: 4).
    assert pa.prefill_launch(256, 128, group=4) == pa.PrefillLaunch(128, 32, 4, 3, pack_gqa=True)
    assert pa.prefill_launch(1024, 128, group=8) == pa.PrefillLaunch(128, 32, 4, 3, pack_gqa=True)
    assert pa.prefill_launch(8192, 128, group=4) == pa.PrefillLaunch(128, 128, 8, 2, pack_gqa=True)
    assert pa.prefill_launch(8, 128, group=4) == pa.PrefillLaunch(16, 32, 4, 3)
    assert pa.prefill_launch(1024, 128, group=16) == pa.PrefillLaunch(64, 64, 4, 2)  # 8 positions a tile: too few
    assert pa.prefill_launch(1024, 128, smem_limit=99 * 1024, group=4) == pa.PrefillLaunch(64, 32, 4, 3)


@pytest.mark.parametrize("min_keys", [0, 64])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_k(num_splits, min_keys):
    # context lengths 0..150 with pages of 4: splits get uneven and some are empty; with min_keys 64 the shorter
    # contexts use fewer splits than the grid has (1, 1, 1, 1 and 3 of them), with 0 every split takes part.
    b = make_paged_batch([1, 1, 1, 1, 1], [0, 5, 17, 40, 150], 4, 2, head_dim=16, page_size=4, device=DEVICE)
    _write(b, 4)
    launch = pd.DecodeLaunch(min_keys=min_keys)

    def attend():
        return pd.decode_attention(b.q, b.k_cache, b.v_cache, b.seq_len, b.input_pos, b.page_table,
                                   num_splits=num_splits, launch=launch)

    out = attend()
    torch.testing.assert_close(out, reference_attention(b), atol=1e-4, rtol=1e-4)
    # The last split of each (sequence, KV head) merged them and zeroed its arrival counter: a second launch on
    # the same counters (as every layer and every graph replay does) answers the same.
    assert not pd._ARRIVALS[out.device].any()
    assert torch.equal(attend(), out)


def test_mixed_batch_prefill_then_decode():
    b = make_paged_batch([7, 4, 1, 1], [0, 9, 12, 3], 4, 2, head_dim=16, page_size=4, device=DEVICE)
    _write(b, 4)
    ref = reference_attention(b)
    n_pre_tok = 11
    pre = pa.context_attention(b.q[:n_pre_tok], b.k_cache, b.v_cache, b.cu_seqlen[:3], b.input_pos[:2],
                               b.page_table[:2], max_q_len=7)
    dec = pd.decode_attention(b.q[n_pre_tok:], b.k_cache, b.v_cache, b.seq_len[2:], b.input_pos[2:],
                              b.page_table[2:], num_splits=2)
    torch.testing.assert_close(torch.cat([pre, dec]), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        {"sliding_window": 5},
        {"logit_cap": 1.5},
        {"sinks": True},
        {"scale": 0.2, "sliding_window": 3, "logit_cap": 4.0, "sinks": True},
    ],
)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_options_prefill_and_decode(kw, num_splits):
    b = make_paged_batch([9, 1, 1], [4, 15, 2], 4, 2, head_dim=16, page_size=4, device=DEVICE)
    _write(b, 4)
    if kw.get("sinks"):
        kw = {**kw, "sinks": torch.randn(4, generator=torch.Generator().manual_seed(1)).to(DEVICE)}
    ref = reference_attention(b, **kw)
    pre = pa.context_attention(b.q[:9], b.k_cache, b.v_cache, b.cu_seqlen[:2], b.input_pos[:1], b.page_table[:1],
                               **kw)
    dec = pd.decode_attention(b.q[9:], b.k_cache, b.v_cache, b.seq_len[1:], b.input_pos[1:], b.page_table[1:],
                              num_splits=num_splits, **kw)
    torch.testing.assert_close(torch.cat([pre, dec]), ref, atol=1e-4, rtol=1e-4)


def test_head_dim_not_power_of_two_and_bf16():
    b = make_paged_batch([6, 1], [3, 9], 2, 1, head_dim=24, page_size=8, dtype=torch.bfloat16, device=DEVICE)
    _write(b, 8)
    ref = reference_attention(b)
    pre = pa.context_attention(b.q[:6], b.k_cache, b.v_cache, b.cu_seqlen[:2], b.input_pos[:1], b.page_table[:1])
    dec = pd.decode_attention(b.q[6:], b.k_cache, b.v_cache, b.seq_len[1:], b.input_pos[1:], b.page_table[1:])
    assert pre.dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat([pre, dec]), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_large_bf16_on_gpu():
    b = make_paged_batch([300, 77, 1, 1, 1], [0, 250, 1000, 37, 513], 32, 8, head_dim=128, page_size=16,
                         dtype=torch.bfloat16, device="cuda")
    _write(b, 16)
    ref = reference_attention(b)
    pre = pa.context_attention(b.q[:377], b.k_cache, b.v_cache, b.cu_seqlen[:3], b.input_pos[:2], b.page_table[:2])
    dec = pd.decode_attention(b.q[377:], b.k_cache, b.v_cache, b.seq_len[2:], b.input_pos[2:], b.page_table[2:])
    torch.testing.assert_close(torch.cat([pre, dec]), ref, atol=2e-2, rtol=2e-2)
