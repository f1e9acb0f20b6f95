"""Triton write of a step's new keys and values into the paged K/V caches (one program per token)."""

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda

from .pdl import pdl_launch_args


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    s_kt, s_kh, s_vt, s_vh,
    s_cp, s_cs, s_ch, s_vp, s_vs, s_vch,
    N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    page = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < N_KV) & (offs_d[None, :] < HEAD_DIM)
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * s_kt + offs_h[:, None] * s_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t64 * s_vt + offs_h[:, None] * s_vh + offs_d[None, :], mask=mask)
    kc = k_cache_ptr + page * s_cp + off * s_cs + offs_h[:, None] * s_ch + offs_d[None, :]
    vc = v_cache_ptr + page * s_vp + off * s_vs + offs_h[:, None] * s_vch + offs_d[None, :]
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def slot_mapping_for(
    cu_seqlen: torch.Tensor, input_pos: torch.Tensor, page_table: torch.Tensor, page_size: int, num_tokens: int
) -> torch.Tensor:
    """int64 [T] flat cache slot (page * page_size + offset) of each new token; device ops only (no sync)."""
    t = torch.arange(num_tokens, device=cu_seqlen.device, dtype=torch.int64)
    cu = cu_seqlen.to(torch.int64)
    b = torch.searchsorted(cu[1:], t, right=True).clamp_(max=cu.numel() - 2)
    pos = input_pos.to(torch.int64)[b] + t - cu[b]
    return page_table.to(torch.int64)[b, pos // page_size] * page_size + pos % page_size


def write_paged_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new keys/values k, v [T, n_kv_heads, head_dim] at flat slots slot_mapping [T] of the caches."""
    num_tokens, n_kv, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        N_KV=n_kv, HEAD_DIM=head_dim, PAGE_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(n_kv), BLOCK_D=triton.next_power_of_2(head_dim), **pdl_launch_args(k.device),
    )
