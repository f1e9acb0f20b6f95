"""Triton GEMV for one-row linears (batch-1 decode): every weight read once, no split-K partial sums to reduce.

cuBLAS splits K for one-row products and adds reduce kernels; on an H200 (benchmarks/README.md,
`gpu/small_batch_kernels.py`) its one-row products of Llama-3.1-8B shapes took 62.8 / 32.4 / 14.9 us (gate_up,
down, qkv) where a GEMV of this form took 54.7 / 30.0 / 12.8.
"""

import os
from functools import cache

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda

from .pdl import pdl_launch_args


_WEIGHTS_FIRST = os.environ.get("AUTODEPLOY_GEMV_WEIGHTS_FIRST", "1") != "0"

# What the GEMV computes its input row from (a constexpr of the kernel): the row itself, or the op before it.
PLAIN, ADD_RMSNORM, SWIGLU = 0, 1, 2


@triton.jit
def _input_features(x_ptr, r_ptr, nw_ptr, kk, k_ok, rstd, gate_off, up_off, PROLOGUE: tl.constexpr):
    """Input features kk in fp32, rounded as the unfused op before the linear would have written them."""
    if PROLOGUE == 1:  # weight * rmsnorm(x + residual), as triton/rmsnorm.py's add_rmsnorm
        x = tl.load(x_ptr + kk, mask=k_ok, other=0.0)
        s = (x.to(tl.float32) + tl.load(r_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)).to(x.dtype)
        y = (s.to(tl.float32) * rstd).to(x.dtype).to(tl.float32)
        w = tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        return (w * y).to(x.dtype).to(tl.float32)
    elif PROLOGUE == 2:  # silu(gate) * up from one gate_up row, one rounding (as Inductor's fused kernel)
        g = tl.load(x_ptr + gate_off + kk, mask=k_ok, other=0.0)
        gf = g.to(tl.float32)
        u = tl.load(x_ptr + up_off + kk, mask=k_ok, other=0.0).to(tl.float32)
        return (gf / (1.0 + tl.exp(-gf)) * u).to(g.dtype).to(tl.float32)
    else:
        return tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)


@triton.jit
def _rstd_and_sum(x_ptr, r_ptr, sum_ptr, K, eps, write_sum, BLOCK_K: tl.constexpr):
    """1 / RMS of x + residual over all K features; the program with write_sum also stores the sum (the
    residual stream the next layer reads). Every program reads the row (from L2: K values, twice)."""
    offs_k = tl.arange(0, BLOCK_K)
    sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_ptr + kk, mask=k_ok, other=0.0)
        s = (x.to(tl.float32) + tl.load(r_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + kk, s, mask=k_ok & write_sum)
        sf = s.to(tl.float32)
        sq += sf * sf
    return 1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, K, N, s_wn,
    r_ptr, nw_ptr, sum_ptr, eps, gate_off, up_off,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr, WEIGHTS_FIRST: tl.constexpr,
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
    # (AUTODEPLOY_GEMV_WEIGHTS_FIRST=0 waits first, to measure what this is worth.)
    first = rows + offs_k[None, :]
    first_ok = n_ok[:, None] & (offs_k < K)[None, :]
    if WEIGHTS_FIRST:
        w = tl.load(first, mask=first_ok, other=0.0)
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    if not WEIGHTS_FIRST:
        w = tl.load(first, mask=first_ok, other=0.0)
    rstd = 1.0
    if PROLOGUE == 1:
        rstd = _rstd_and_sum(x_ptr, r_ptr, sum_ptr, K, eps, pid == 0, BLOCK_K)
    x = _input_features(x_ptr, r_ptr, nw_ptr, offs_k, offs_k < K, rstd, gate_off, up_off, PROLOGUE)
    acc = w.to(tl.float32) * x[None, :]
    for k0 in tl.range(BLOCK_K, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        w = tl.load(rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = _input_features(x_ptr, r_ptr, nw_ptr, kk, k_ok, rstd, gate_off, up_off, PROLOGUE)
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


def _one_row(x: torch.Tensor, k: int, what: str) -> torch.Tensor:
    """x as a contiguous vector of k features (it must hold exactly one row)."""
    if x.numel() != k:
        raise ValueError(f"gemv needs one row of {k} {what}, got input of shape {tuple(x.shape)}")
    x1 = x.reshape(k)
    return x1 if x1.stride(0) == 1 else x1.contiguous()


def _launch(x1, weight, bias, y, k, prologue=PLAIN, residual=None, norm_weight=None, summed=None, eps=0.0,
            gate_off=0, up_off=0) -> None:
    n = weight.shape[0]
    cfg = launch_config(n, k, x1.device)
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x1, weight, bias if bias is not None else weight, y, k, n, weight.stride(0),
        residual if residual is not None else x1, norm_weight if norm_weight is not None else x1,
        summed if summed is not None else y, eps, gate_off, up_off,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, WEIGHTS_FIRST=_WEIGHTS_FIRST, **cfg,
        **pdl_launch_args(x1.device),
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """aten.linear(x, weight, bias) for an x of exactly one row (any leading shape of product 1).

    weight [N, K] with unit stride along K; x, weight and bias of one floating dtype (as aten.linear needs).
    """
    _check_weight(weight)
    n, k = weight.shape
    x1 = _one_row(x, k, "features")
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _launch(x1, weight, bias, y, k)
    return y


def add_rmsnorm_gemv(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rmsnorm(x + residual) * norm_weight, weight, bias), x + residual) for one row, in one kernel.

    Every program computes the row's RMS itself (the row is small and sits in L2), so no kernel runs before the
    GEMV; x, residual, norm_weight and weight share one dtype.
    """
    _check_weight(weight)
    n, k = weight.shape
    x1, r1 = _one_row(x, k, "features"), _one_row(residual, k, "residual features")
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _launch(x1, weight, bias, y, k, ADD_RMSNORM, r1, norm_weight.contiguous(), summed, eps)
    return y, summed


def swiglu_gemv(
    gate_up: torch.Tensor, gate_off: int, up_off: int, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """linear(silu(gate) * up, weight, bias) for one row of gate_up, whose features [gate_off, gate_off + K)
    are the gate and [up_off, up_off + K) the up projection (K = weight's input features), in one kernel."""
    _check_weight(weight)
    n, k = weight.shape
    row = _one_row(gate_up, gate_up.shape[-1], "gate/up features")
    if max(gate_off, up_off) + k > row.numel():
        raise ValueError(f"gate/up offsets {gate_off}, {up_off} + {k} features exceed the row of {row.numel()}")
    y = torch.empty((*gate_up.shape[:-1], n), dtype=gate_up.dtype, device=gate_up.device)
    _launch(row, weight, bias, y, k, SWIGLU, gate_off=gate_off, up_off=up_off)
    return y
