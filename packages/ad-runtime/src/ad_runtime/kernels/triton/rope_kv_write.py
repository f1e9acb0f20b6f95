"""RoPE of a step's queries and keys fused with the paged K/V write: one launch a layer instead of two.

Programs of up to eight heads of a token rotate its query heads into the output, rotate its key heads straight
into the key cache and copy its value heads into the value cache. A batch-1 decode step of Llama-3.1-8B spent
~84 us in 32 RoPE launches and ~38 us in 32 K/V writes, each kernel far shorter than its launch; the rotated keys never
exist outside the cache.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda

from .pdl import pdl_launch_args
from .rope import _rotate_heads


@triton.jit
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, qo_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, cs_ptr,
    s_qt, s_qn, s_kt, s_kn, s_vt, s_vn, s_qot, s_qon,
    s_cp, s_cs, s_ch, s_vp, s_vs, s_vch, s_cst, s_pt,
    NQ, NK,
    PAGE_SIZE: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Program (t, g) takes BLOCK_H heads of token t: the first groups its query heads, the rest its key heads and
    # their values. One program a token did all of them one block after another: at batch 1 a single program on
    # one SM, every block's loads waiting for the block before, on the critical path of each layer.
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    q_groups = tl.cdiv(NQ, BLOCK_H)
    # The same [cos | sin] row and rotation as the rope kernel, so the cache holds the keys it would have written.
    # Position, slot and cos/sin are read before waiting for the previous kernel (the projection of q, k, v): the
    # step's metadata is written before the step and the table never, and the kernel before waited for all
    # earlier work before it let this one launch (pdl.py), so the two dependent loads leave the critical path.
    p = tl.load(pos_ptr + t * s_pt).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_HALF)
    i_ok = offs_i < HALF
    c = tl.load(cs_ptr + p * s_cst + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    sn = tl.load(cs_ptr + p * s_cst + HALF + offs_i, mask=i_ok, other=0.0).to(tl.float32)
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    if g < q_groups:
        h0 = g * BLOCK_H
        _rotate_heads(q_ptr + t * s_qt + h0 * s_qn, qo_ptr + t * s_qot + h0 * s_qon, s_qn, s_qon,
                      tl.minimum(NQ - h0, BLOCK_H), c, sn, offs_i, i_ok, HALF, BLOCK_H)
    else:
        h0 = (g - q_groups) * BLOCK_H
        page = slot // PAGE_SIZE
        off = slot % PAGE_SIZE
        _rotate_heads(k_ptr + t * s_kt + h0 * s_kn, k_cache_ptr + page * s_cp + off * s_cs + h0 * s_ch, s_kn, s_ch,
                      tl.minimum(NK - h0, BLOCK_H), c, sn, offs_i, i_ok, HALF, BLOCK_H)
        offs_h = h0 + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < NK) & (offs_d[None, :] < HEAD_DIM)
        vals = tl.load(v_ptr + t * s_vt + offs_h[:, None] * s_vn + offs_d[None, :], mask=mask)
        vc = v_cache_ptr + page * s_vp + off * s_vs + offs_h[:, None] * s_vch + offs_d[None, :]
        tl.store(vc, vals.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_and_write_paged_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, position_ids: torch.Tensor, cos_sin_cache: torch.Tensor,
) -> torch.Tensor:
    """q [T, nq, d], k/v [T, nkv, d] before RoPE; position_ids [T]; cos_sin_cache [max_pos, d] = [cos | sin].

    Stores rotated keys and the values at flat slots slot_mapping [T] of the caches and returns the rotated
    queries [T, nq, d] in dtype result_type(q, cos_sin_cache), as the rope op would give them.
    """
    num_tokens, nq, head_dim = q.shape
    nk = k.shape[1]
    half = head_dim // 2
    assert 2 * half == head_dim and cos_sin_cache.shape[-1] == head_dim, "full-width rotate-half RoPE only"
    assert all(x.stride(-1) == 1 for x in (q, k, v, k_cache, v_cache, cos_sin_cache))
    q_out = torch.empty(q.shape, dtype=torch.result_type(q, cos_sin_cache), device=q.device)
    if num_tokens == 0:
        return q_out
    block_h = min(8, triton.next_power_of_2(max(nq, nk)))
    _rope_write_kv_kernel[(num_tokens, triton.cdiv(nq, block_h) + triton.cdiv(nk, block_h))](
        q, k, v, q_out, k_cache, v_cache, slot_mapping, position_ids, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), cos_sin_cache.stride(0), position_ids.stride(0),
        nq, nk,
        PAGE_SIZE=k_cache.shape[1], HALF=half, HEAD_DIM=head_dim,
        BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(head_dim),
        **pdl_launch_args(q.device),
    )
    return q_out
