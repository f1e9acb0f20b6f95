"""rope_and_write_paged_kv (one launch) against the rope kernel followed by the K/V write (two launches)."""

import pytest
import torch
from ad_runtime.kernels.triton.paged_kv_write import write_paged_kv
from ad_runtime.kernels.triton.rope import rope_with_cos_sin_cache
from ad_runtime.kernels.triton.rope_kv_write import rope_and_write_paged_kv


def _case(num_tokens, nq, nk, d, dtype, device, page_size=4, max_pos=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_pages = num_tokens // page_size + 2  # room for every token, and slots left untouched
    qkv = torch.randn(num_tokens, nq + 2 * nk, d, generator=g).to(device=device, dtype=dtype)
    q, k, v = qkv.split([nq, nk, nk], dim=1)  # strided views, as the split of a fused qkv projection gives them
    pos = torch.randint(0, max_pos, (num_tokens,), generator=g).to(device)
    table = torch.randn(max_pos, d, generator=g).to(device=device, dtype=dtype)
    slots = torch.randperm(num_pages * page_size, generator=g)[:num_tokens].to(device)
    caches = [torch.randn(num_pages, page_size, nk, d, generator=g).to(device=device, dtype=dtype) for _ in range(2)]
    return q, k, v, pos, table, slots, caches


def _check(num_tokens, nq, nk, d, dtype, device):
    q, k, v, pos, table, slots, (kc, vc) = _case(num_tokens, nq, nk, d, dtype, device)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    ref_q, ref_k = rope_with_cos_sin_cache(q[None], k[None], pos[None], table, 2)
    write_paged_kv(ref_k[0], v, ref_kc, ref_vc, slots)
    out = rope_and_write_paged_kv(q, k, v, kc, vc, slots, pos, table)
    assert out.dtype == ref_q.dtype and out.shape == q.shape
    # The same float32 arithmetic in both: equal bits, and untouched slots stay as they were.
    assert torch.equal(out, ref_q[0])
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)


@pytest.mark.parametrize("num_tokens, nq, nk, d", [(1, 4, 2, 16), (7, 6, 1, 8), (5, 20, 4, 16), (3, 12, 12, 16)])
def test_matches_rope_then_write(num_tokens, nq, nk, d):
    _check(num_tokens, nq, nk, d, torch.float32, "cuda" if torch.cuda.is_available() else "cpu")


def test_no_tokens_writes_nothing():
    q, k, v, pos, table, slots, (kc, vc) = _case(0, 4, 2, 8, torch.float32, "cpu")
    before = kc.clone()
    assert rope_and_write_paged_kv(q, k, v, kc, vc, slots, pos, table).shape == (0, 4, 8)
    assert torch.equal(kc, before)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 33, 300])
def test_bf16_llama_8b_heads_on_gpu(num_tokens):
    _check(num_tokens, 32, 8, 128, torch.bfloat16, "cuda")
