"""Triton GEMM for a few rows (the decode steps of batches of 2-64): every weight read once, no split-K reduce.

cuBLAS splits K for these products and adds reduce kernels, and a merged gate/up product is followed by a separate
activation kernel. Here each program owns BLOCK_N output features over the whole K and multiplies the rows' tile
on tensor cores; with SWIGLU the weight is a merged [gate; up], each program also owns the matching up rows and
writes silu(gate) * up. H200, Llama-3.1-8B shapes, bf16, each call on another copy of the weight
(`benchmarks/gpu/skinny_gemm_bench.py`, us a call at 8 rows, cuBLAS first): qkv 15.3 / 15.0, o_proj 12.3 / 11.2,
gate_up with its activation 64.6 / 57.9, down 32.3 / 31.3, LM head 253.5 / 238.8. A whole layer's products
(`--layer`): 122.9 / 117.5 us at 8 rows, 130.3 / 126.5 at 64; the engine's decode step 4.94 / 4.80 ms at 8 rows,
6.90 / 6.67 at 64 (benchmarks/README, 2026-12-02).
"""

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda

from .paged_attention import _dot_dtype
from .paged_decode import _num_sms
from .pdl import pdl_launch_args

MAX_ROWS = 64
WIDE = 16384  # output features from which 64-feature blocks still give every SM several programs (LM heads)


# The row count varies between a step's graphs and eager chunks: without this Triton would compile a variant per
# divisibility of M (mid-serving, after the build warmed the rest). The pointers keep their alignment specialisation
# (skinny_linear passes only 16-byte aligned ones): without it x's tiles load element by element, outside the
# asynchronous copy pipeline.
@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, K, N, s_xm, s_wn, s_ym,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, USE_PDL: tl.constexpr, TRIGGER_EARLY: tl.constexpr = False,
):
    # With SWIGLU, N is the width of the output (half the weight's rows): row n of gate pairs with row N + n of up.
    if USE_PDL:
        cuda.gdc_wait()
        if TRIGGER_EARLY:
            cuda.gdc_launch_dependents()
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    m_ok = offs_m < M
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn
    up_rows = rows + N.to(tl.int64) * s_wn
    x_rows = x_ptr + offs_m[:, None] * s_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(DOT_DTYPE)), acc)
        if SWIGLU:
            w_up = tl.load(up_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc_up = tl.dot(x, tl.trans(w_up.to(DOT_DTYPE)), acc_up)
    if USE_PDL and not TRIGGER_EARLY:
        # A grid of more programs than SMs lets the next kernel launch only now: launched at the start (as the other
        # kernels do), its programs sat on the SMs waiting and took the shared memory this kernel's later programs
        # needed (H200, a layer's products at 8 rows: 142 us with the early trigger, 120 without PDL;
        # skinny_gemm_bench.py --layer). A grid of one wave has no later programs: it triggers at its start.
        cuda.gdc_launch_dependents()
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc_up += tl.load(b_ptr + N + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = acc
    if SWIGLU:
        # gate and up rounded to the output dtype first, as the unfused GEMM stored them for the activation kernel.
        gate = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        y = gate * tl.sigmoid(gate) * acc_up.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * s_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def launch_config(n: int, k: int, rows: int, swiglu: bool) -> dict:
    """Tiles for `n` output features (per half with swiglu) over `k` inputs at `rows` rows: the H200 sweep's best
    (skinny_gemm_bench.py at 8-64 rows) - 64 x 128 tiles for merged gate/up and LM-head widths, 32 x 256 else."""
    bn, bk = (64, 128) if swiglu or n >= WIDE else (32, 256)
    return dict(BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=bn, BLOCK_K=min(bk, triton.next_power_of_2(k)),
                num_warps=4, num_stages=4)


def trigger_early(n: int, block_n: int, device: torch.device) -> bool:
    """Whether a launch lets its successor launch at its start: where its programs fit in one wave (one per SM),
    none of them waits for a place the successor's waiting programs could take. H200, 32 rows, o_proj and down
    (128 programs) so: a layer's products 127.6 against 128.7 us, the 8B decode step 5.58 against 5.71 ms
    (benchmarks/README, 2026-12-02, second session, call B)."""
    return triton.cdiv(n, block_n) <= _num_sms(device)


def takes(x: torch.Tensor, weight: torch.Tensor, swiglu: bool = False) -> bool:
    """Whether this kernel computes linear(x, weight): 2..MAX_ROWS rows of bf16 or fp16 (fp32 keeps cuBLAS's exact
    products: tensor cores would round it to tf32) with a weight of unit stride along K, and not where cuBLAS was
    faster: above 16 rows, a narrow output whose 32-feature blocks are more than one program per SM but too few for
    many (qkv of Llama-3.1-8B, 192 programs on 132 SMs: 16.5 against cuBLAS's 15.6 us at 32 rows).
    AUTODEPLOY_SKINNY_GEMM=0 turns it off (to compare)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not (2 <= rows <= MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x.dtype
            and weight.dim() == 2 and weight.stride(1) == 1 and os.environ.get("AUTODEPLOY_SKINNY_GEMM", "1") != "0"):
        return False
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    wide = swiglu or n >= WIDE
    return rows <= 16 or wide or triton.cdiv(n, 32) <= _num_sms(x.device)


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool = False, launch: dict | None = None
) -> torch.Tensor:
    """aten.linear(x, weight, bias) for 2..MAX_ROWS rows; with `swiglu`, silu(gate) * up of [gate | up] = that
    product (weight the merged [gate; up] rows). `launch` replaces launch_config's tiles (the benchmark's sweep) and,
    where it names TRIGGER_EARLY, trigger_early's choice."""
    rows_w, k = weight.shape
    if swiglu and rows_w % 2:
        raise ValueError(f"skinny_linear with swiglu needs a merged [gate; up] weight of even rows, got {rows_w}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.data_ptr() % 16:  # one aligned variant of the kernel, not two
        x2 = x2.clone(memory_format=torch.contiguous_format)
    m = x2.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"skinny_linear takes 1..{MAX_ROWS} rows, got {m}")
    n = rows_w // 2 if swiglu else rows_w
    y = torch.empty((m, n), dtype=weight.dtype, device=x.device)
    cfg = {**launch} if launch else launch_config(n, k, m, swiglu)  # a fresh dict either way: the trigger joins it
    cfg.setdefault("TRIGGER_EARLY", trigger_early(n, cfg["BLOCK_N"], x.device))
    _skinny_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x2, weight, bias if bias is not None else weight, y, m, k, n, x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, SWIGLU=swiglu, DOT_DTYPE=_dot_dtype(weight.dtype), **cfg,
        **pdl_launch_args(x.device),
    )
    return y.reshape(*x.shape[:-1], n)
