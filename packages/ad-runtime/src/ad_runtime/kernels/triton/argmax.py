"""Greedy argmax over the vocabulary in two short Triton launches: chunk maxima, then one pick per row.

torch.argmax of one bf16 row of Llama-3.1-8B's 128,256 logits took 36.8 us of a 4.3 ms batch-1 decode step on an
H200 (one reduction kernel that barely fills the GPU) for 0.25 MB of reads; chunks read by many programs take a
few microseconds. Same answer as torch.argmax: the first index of the maximum, a NaN counting as the maximum (as
+inf: a row holding both a NaN and +inf gives the first of either, where torch gives the first NaN).
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda

from .pdl import pdl_launch_args

CHUNK = 4096  # vocabulary entries a program of the first launch reads


@triton.jit
def _chunk_max_kernel(x_ptr, val_ptr, idx_ptr, V, s_xb, NUM_CHUNKS, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * s_xb + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN is the maximum, as for torch.argmax
    i = tl.argmax(x, axis=0, tie_break_left=True)
    tl.store(val_ptr + row * NUM_CHUNKS + c, tl.max(x, axis=0))
    tl.store(idx_ptr + row * NUM_CHUNKS + c, c * BLOCK + i)


@triton.jit
def _row_pick_kernel(val_ptr, idx_ptr, out_ptr, NUM_CHUNKS, BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr):
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    ok = offs < NUM_CHUNKS
    v = tl.load(val_ptr + row * NUM_CHUNKS + offs, mask=ok, other=float("-inf"))
    best = tl.argmax(v, axis=0, tie_break_left=True)  # chunks are in index order: the first chunk holds the first
    tl.store(out_ptr + row, tl.sum(tl.where(offs == best, tl.load(idx_ptr + row * NUM_CHUNKS + offs, mask=ok,
                                                                   other=0), 0)).to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) of 2-D logits [B, V] (unit stride along V) as int64 [B]."""
    b, v = logits.shape
    assert logits.stride(-1) == 1, "the vocabulary must be contiguous"
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b == 0:
        return out
    chunks = triton.cdiv(v, CHUNK)
    vals = torch.empty(b, chunks, dtype=torch.float32, device=logits.device)
    idxs = torch.empty(b, chunks, dtype=torch.int32, device=logits.device)
    pdl = pdl_launch_args(logits.device)
    _chunk_max_kernel[(b, chunks)](logits, vals, idxs, v, logits.stride(0), chunks, BLOCK=CHUNK, num_warps=8, **pdl)
    _row_pick_kernel[(b,)](vals, idxs, out, chunks, BLOCK_C=triton.next_power_of_2(chunks), **pdl)
    return out
