"""Triton GEMV for one-row linears (batch-1 decode): every weight read once, no split-K partial sums to reduce.

cuBLAS splits K for one-row products and adds reduce kernels; on an H200 (benchmarks/README.md,
`gpu/small_batch_kernels.py`) its one-row products of Llama-3.1-8B shapes took 62.8 / 32.4 / 14.9 us (gate_up,
down, qkv) where a GEMV of this form took 54.7 / 30.0 / 12.8.
"""

from functools import cache

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda

from .pdl import pdl_launch_args


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, K, N, s_wn,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    # Each program owns BLOCK_N output features over the whole K. The products are summed along K once, after
    # the loop: a [BLOCK_N, BLOCK_K] fp32 accumulator keeps the loop free of cross-thread reductions.
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn
    # The first weight tile is read before waiting for the kernel before this one: weights are never written
    # during a step, so with PDL their first bytes come from memory while the predecessor still runs (its
    # latency was part of every one of a decode step's ~130 GEMV boundaries). Only the input row must wait.
    # (H200, 8B shapes, batch 1: 4.28 ms a step against 4.32 with the wait first; benchmarks/README, call H.)
    w = tl.load(rows + offs_k[None, :], mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0)
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * x[None, :]
    for k0 in tl.range(BLOCK_K, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        w = tl.load(rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@cache
def _programs_wanted(device: torch.device) -> int:
    """About two programs per SM keep every SM streaming weights (one SM when there is no GPU: the interpreter)."""
    if device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def launch_config(n: int, k: int, device: torch.device) -> dict:
    """Tile sizes from the H200 sweep of `benchmarks/gpu/small_batch_kernels.py` (Llama-3.1-8B and SmolLM2 shapes):
    16 x 256 tiles where they give four programs per SM or more (gate_up, LM head), else 8 x 512 where they give
    two (qkv, o_proj, down), else 4 x 512 (small models)."""
    want = _programs_wanted(device)
    if triton.cdiv(n, 16) >= 2 * want:
        block_n, block_k = 16, 256
    else:
        block_n, block_k = (8, 512) if triton.cdiv(n, 8) >= want else (4, 512)
    return dict(BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(k)), num_warps=4, num_stages=3)


def _check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError("gemv needs a 2-D weight with unit stride along its input features")


def _one_row(x: torch.Tensor, k: int) -> torch.Tensor:
    """x as a contiguous vector of k features (it must hold exactly one row)."""
    if x.numel() != k:
        raise ValueError(f"gemv needs one row of {k} features, got input of shape {tuple(x.shape)}")
    x1 = x.reshape(k)
    return x1 if x1.stride(0) == 1 else x1.contiguous()


def _launch(x1: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, k: int) -> None:
    n = weight.shape[0]
    cfg = launch_config(n, k, x1.device)
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x1, weight, bias if bias is not None else weight, y, k, n, weight.stride(0),
        HAS_BIAS=bias is not None, **cfg, **pdl_launch_args(x1.device),
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """aten.linear(x, weight, bias) for an x of exactly one row (any leading shape of product 1).

    weight [N, K] with unit stride along K; x, weight and bias of one floating dtype (as aten.linear needs).
    """
    _check_weight(weight)
    n, k = weight.shape
    x1 = _one_row(x, k)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _launch(x1, weight, bias, y, k)
    return y
