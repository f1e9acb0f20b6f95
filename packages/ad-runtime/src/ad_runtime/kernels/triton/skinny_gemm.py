"""Triton GEMM for a few rows against a large weight (decode batches of 8-64 rows): every weight read once.

cuBLAS splits K for these shapes and adds reduce kernels; on an H200 (benchmarks/README.md, sixteenth session,
`gpu/small_batch_kernels.py`, one kernel captured in a CUDA graph) its products of Llama-3.1-8B's gate_up, down
and LM head took 61-65 / 33-36 / 250-285 us at 8-64 rows, where this kernel took 58-61 / 31-33 / 240-260 (90-99%
of the weights' byte roofline). For qkv and o_proj (under 32 M weights) it was no faster: those stay on cuBLAS.
"""

import torch
import triton
import triton.language as tl

MIN_ROWS, MAX_ROWS = 8, 64  # the row counts measured
MIN_WEIGHTS = 32 * 1024 * 1024  # smaller weights were not faster than cuBLAS


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, K, N, s_xm, s_wn, s_ym,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    # Each program owns BLOCK_N output features over the whole K: no partial sums to reduce afterwards. The rows'
    # tile (padded to BLOCK_M >= 16, tl.dot's least) multiplies the weight tile on tensor cores in fp32.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, m_ok = offs_n < N, offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * s_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * s_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * s_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def takes(rows: int, weight: torch.Tensor) -> bool:
    """Whether a product of `rows` rows with this weight goes through the kernel: 8-64 rows, a 2-D 16-bit weight
    of at least MIN_WEIGHTS elements with unit stride along its input features."""
    return (MIN_ROWS <= rows <= MAX_ROWS and weight.dim() == 2 and weight.stride(1) == 1
            and weight.numel() >= MIN_WEIGHTS and weight.element_size() == 2)


def launch_config(k: int) -> dict:
    """From the H200 sweep: long rows (down, K = 14,336) 32 x 256 tiles in six stages; the others 64 x 128 in three."""
    if k >= 8192:
        return dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=6)
    return dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """aten.linear(x, weight, bias) for x of a few rows (any leading shape), weight [N, K] with unit stride
    along K; x, weight and bias of one floating dtype."""
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = launch_config(k)
    _skinny_gemm_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x2, weight, bias if bias is not None else weight, y, m, k, n, x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=max(16, triton.next_power_of_2(m)), **cfg,
    )
    return y.view(*x.shape[:-1], n)
