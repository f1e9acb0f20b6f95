"""Triton GEMV for one-row linears (batch-1 decode): every weight read once, no split-K partial sums to reduce.

With SWIGLU the weight is a merged [gate; up] and each program also owns the matching up rows, so it writes
silu(gate) * up directly (the launch of a separate activation kernel after the GEMM is gone).

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
def _input_slice(x_ptr, r_ptr, nw_ptr, kk, k_ok, rstd, NORM: tl.constexpr, DTYPE: tl.constexpr):
    """Input features kk of the GEMV in fp32; with NORM, rmsnorm(x + r) * nw as the add_rmsnorm kernel rounds it
    (sum in x's dtype, normalised values in it, the product in the GEMV's dtype)."""
    x = tl.load(x_ptr + kk, mask=k_ok, other=0.0)
    if NORM:
        r = tl.load(r_ptr + kk, mask=k_ok, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype).to(tl.float32)
        nw = tl.load(nw_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        return (nw * (s * rstd).to(x.dtype).to(tl.float32)).to(DTYPE).to(tl.float32)
    return x.to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, nw_ptr, sum_ptr, eps, K, N, s_wn,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, NORM: tl.constexpr, HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    # Each program owns BLOCK_N output features over the whole K. The products are summed along K once, after
    # the loop: a [BLOCK_N, BLOCK_K] fp32 accumulator keeps the loop free of cross-thread reductions.
    # With SWIGLU, N is the width of the output (half the weight's rows): row n of gate pairs with row N + n of up.
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn
    up_rows = rows + N.to(tl.int64) * s_wn
    # The first weight tile is read before waiting for the kernel before this one: weights are never written
    # during a step, so with PDL their first bytes come from memory while the predecessor still runs (its
    # latency was part of every one of a decode step's ~130 GEMV boundaries). Only the input row must wait.
    # (H200, 8B shapes, batch 1: 4.28 ms a step against 4.32 with the wait first; benchmarks/README, call H.)
    tile_ok = n_ok[:, None] & (offs_k < K)[None, :]
    w = tl.load(rows + offs_k[None, :], mask=tile_ok, other=0.0)
    if SWIGLU:
        w_up = tl.load(up_rows + offs_k[None, :], mask=tile_ok, other=0.0)
    if USE_PDL:
        cuda.gdc_wait()
        cuda.gdc_launch_dependents()
    rstd = 0.0
    if NORM:
        # x + residual and its RMS over the whole row (HIDDEN = K features in a block of BLOCK_H), as the
        # add_rmsnorm kernel computes them; program 0 stores the sum, the next residual. Every program needs the
        # row's RMS before its first slice: the row is small and read from L2 by all but the first.
        offs_h = tl.arange(0, BLOCK_H)
        h_ok = offs_h < HIDDEN
        s = (tl.load(x_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)
             + tl.load(r_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
        if pid == 0:
            tl.store(sum_ptr + offs_h, s, mask=h_ok)
        sf = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / HIDDEN + eps)
    x = _input_slice(x_ptr, r_ptr, nw_ptr, offs_k, offs_k < K, rstd, NORM, w_ptr.dtype.element_ty)
    acc = w.to(tl.float32) * x[None, :]
    if SWIGLU:
        acc_up = w_up.to(tl.float32) * x[None, :]
    for k0 in tl.range(BLOCK_K, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        # Weights before the input slice: with x loaded first the plain GEMV took 4.78 ms a batch-1 8B step
        # against 4.26 (H200, benchmarks/README, call O): the order sets how the loads are pipelined.
        w = tl.load(rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if SWIGLU:
            w_up = tl.load(up_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = _input_slice(x_ptr, r_ptr, nw_ptr, kk, k_ok, rstd, NORM, w_ptr.dtype.element_ty)
        acc += w.to(tl.float32) * x[None, :]
        if SWIGLU:
            acc_up += w_up.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    if SWIGLU:
        up = tl.sum(acc_up, axis=1)
        if HAS_BIAS:
            up += tl.load(b_ptr + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        # gate and up rounded to the output dtype first: the same values the unfused GEMV stored and the
        # activation kernel read back, so the fused and unfused graphs agree.
        gate = y.to(y_ptr.dtype.element_ty).to(tl.float32)
        up = up.to(y_ptr.dtype.element_ty).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, N, s_gu, s_y, BLOCK: tl.constexpr):
    # One pass over rows of [gate | up]: y = silu(gate) * up in fp32, as the fused activation kernel computes it.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    gate = tl.load(gu_ptr + row * s_gu + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * s_gu + N + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * s_y + offs, (gate * tl.sigmoid(gate) * up).to(y_ptr.dtype.element_ty), mask=ok)


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


def _one_row(x: torch.Tensor, k: int) -> torch.Tensor:
    """x (one row of k features, any leading shape) as a contiguous vector."""
    if x.numel() != k:
        raise ValueError(f"gemv needs one row of {k} features, got input of shape {tuple(x.shape)}")
    x1 = x.reshape(k)
    return x1 if x1.stride(0) == 1 else x1.contiguous()


def _gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool,
    norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One GEMV launch for an x of exactly one row; with `swiglu`, silu(gate) * up of a merged [gate; up] weight;
    with `norm` = (residual, norm_weight, eps), of rmsnorm(x + residual) * norm_weight. Returns (y, x + residual
    or None)."""
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError("gemv needs a 2-D weight with unit stride along its input features")
    rows, k = weight.shape
    if swiglu and rows % 2:
        raise ValueError(f"gemv_swiglu needs a merged [gate; up] weight of even rows, got {rows}")
    x1 = _one_row(x, k)
    n = rows // 2 if swiglu else rows  # the width of the output
    y = torch.empty((*x.shape[:-1], n), dtype=weight.dtype, device=x.device)
    cfg = launch_config(rows, k, x1.device)
    if swiglu:  # each program reads its gate rows and as many up rows: the tile the plain GEMV would read
        cfg["BLOCK_N"] = max(1, cfg["BLOCK_N"] // 2)
    summed = None
    r1, nw, eps = x1, x1, 0.0
    if norm is not None:
        residual, nw, eps = norm
        r1, nw = _one_row(residual, k), nw.contiguous()
        summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x1, weight, bias if bias is not None else weight, y, r1, nw, summed if summed is not None else y, eps,
        k, n, weight.stride(0), HAS_BIAS=bias is not None, SWIGLU=swiglu, NORM=norm is not None,
        HIDDEN=k if norm is not None else 0, BLOCK_H=triton.next_power_of_2(k) if norm is not None else 1,
        **cfg, **pdl_launch_args(x1.device),
    )
    return y, summed


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """aten.linear(x, weight, bias) for an x of exactly one row (any leading shape of product 1).

    weight [N, K] with unit stride along K; x, weight and bias of one floating dtype (as aten.linear needs).
    """
    return _gemv(x, weight, bias, swiglu=False)[0]


def gemv_swiglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(gate) * up of y = aten.linear(x, weight, bias), y = [gate | up], for an x of exactly one row."""
    return _gemv(x, weight, bias, swiglu=True)[0]


def add_rmsnorm_gemv(
    x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gemv(n), x + residual) for n = rmsnorm(x + residual) * norm_weight, one row, in one launch: the result of
    add_rmsnorm followed by gemv (or gemv_swiglu), rounded where they round. x and residual share a shape and
    dtype; the norm's output dtype must be the weight's (as aten.linear needs)."""
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"add_rmsnorm_gemv needs x and residual of one shape and dtype, got {tuple(x.shape)} "
                         f"{x.dtype} and {tuple(residual.shape)} {residual.dtype}")
    if torch.result_type(norm_weight, x) != weight.dtype:
        raise ValueError(f"add_rmsnorm_gemv: the norm gives {torch.result_type(norm_weight, x)}, the linear's weight "
                         f"is {weight.dtype}")
    return _gemv(x, weight, bias, swiglu, norm=(residual, norm_weight, eps))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along its last dimension, any number of rows, in one pass."""
    n = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * n)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    y = torch.empty((*gate_up.shape[:-1], n), dtype=gate_up.dtype, device=gate_up.device)
    if gu.shape[0]:
        block = min(1024, triton.next_power_of_2(max(n, 1)))
        _silu_mul_kernel[(gu.shape[0], triton.cdiv(n, block))](gu, y, n, gu.stride(0), n, BLOCK=block, num_warps=4)
    return y
