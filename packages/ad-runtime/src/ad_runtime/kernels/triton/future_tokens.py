"""Placeholder token ids -(row + 1) replaced by the previous step's sampled ids, in one Triton launch.

Overlapped scheduling feeds a step with tokens the host has not read yet; the torch form of this (bitwise not,
clamp, index_select, compare, where) was five kernels outside the decode graph, each a few microseconds of a
~0.6 ms small-model step that the GPU runs one after another.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _resolve_kernel(ids_ptr, future_ptr, n, n_future, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    ids = tl.load(ids_ptr + offs, mask=ok, other=0)
    hole = ids < 0
    row = tl.minimum(tl.maximum(-ids - 1, 0), n_future - 1)
    prev = tl.load(future_ptr + row, mask=ok & hole, other=0)
    tl.store(ids_ptr + offs, tl.where(hole, prev, ids), mask=ok & hole)


def resolve_future_tokens_(ids: torch.Tensor, future: torch.Tensor) -> None:
    """In place: each id < 0 of the 1-D int64 `ids` becomes future[-id - 1] (the row clamped into `future`)."""
    n = ids.numel()
    if n == 0 or future.numel() == 0:
        return
    assert ids.is_contiguous() and ids.dtype == future.dtype == torch.int64
    future = future.contiguous()  # a no-op for the sampler's outputs
    block = min(1024, triton.next_power_of_2(n))
    _resolve_kernel[(triton.cdiv(n, block),)](ids, future, n, future.numel(), BLOCK=block)
