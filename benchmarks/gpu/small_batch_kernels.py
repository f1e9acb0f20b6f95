"""Where small-batch decode time goes, kernel by kernel, each timed inside a CUDA graph against its byte roofline.

    python benchmarks/gpu/small_batch_kernels.py --rows 1 4 32

For Llama-3.1-8B shapes (or SmolLM2-135M's, --shapes) in bf16: every linear layer (cuBLAS through F.linear, a
Triton GEMV candidate with a small autotune sweep, and at one row ad_runtime's GEMV with the launch config that
gemv_decode_linear uses) and decode attention over a 1024-token paged cache (FlashInfer's variants and our Triton
split-KV kernel). Each kernel is captured 20 times in one CUDA graph and the graph replayed, so launch overhead
is excluded as it is in our captured decode steps; the roofline is the bytes the kernel must read (weights, or
K and V) over the measured copy bandwidth.
"""

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import copy_bandwidth  # noqa: E402

# (name, out_features, in_features) of one Llama-3.1-8B layer (fused qkv and gate_up) and the LM head.
LINEARS = {
    "llama3.1-8b": [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336),
                    ("lm_head", 128256, 4096)],
    "smollm2-135m": [("qkv", 960, 576), ("o_proj", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
                     ("lm_head", 49152, 576)],
}
REPS = 20


def graph_us(fn, reps: int = REPS, replays: int = 10) -> float:
    """Microseconds per call of `fn`, captured `reps` times in one graph and replayed."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(replays):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / (reps * replays)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, K, N, s_xm, s_wn, s_ym,
                 ROWS: tl.constexpr, ROWS_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Each program owns BLOCK_N output features over the whole K: every weight is read once, no split-K reduce.
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    if ROWS == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            kk = k0 + offs_k
            w = tl.load(w_ptr + offs_n[:, None] * s_wn + kk[None, :], mask=n_ok[:, None] & (kk[None, :] < K),
                        other=0.0)
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        tl.store(y_ptr + offs_n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n_ok)
    else:
        offs_m = tl.arange(0, ROWS_P)
        m_ok = offs_m < ROWS
        acc2 = tl.zeros((ROWS_P, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            kk = k0 + offs_k
            w = tl.load(w_ptr + offs_n[:, None] * s_wn + kk[None, :], mask=n_ok[:, None] & (kk[None, :] < K),
                        other=0.0)
            x = tl.load(x_ptr + offs_m[:, None] * s_xm + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K),
                        other=0.0)
            acc2 += tl.sum(w.to(tl.float32)[None, :, :] * x.to(tl.float32)[:, None, :], axis=2)
        tl.store(y_ptr + offs_m[:, None] * s_ym + offs_n[None, :], acc2.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, y_ptr, M, K, N, s_xm, s_wn, s_ym,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # A few rows against many weights: each program owns BLOCK_N output features over the whole K (every weight
    # read once, no split-K reduce), the rows' tile multiplied on tensor cores.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok, m_ok = offs_n < N, offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        kk = k0 + offs_k
        w = tl.load(w_ptr + offs_n[:, None] * s_wn + kk[None, :], mask=n_ok[:, None] & (kk[None, :] < K), other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * s_xm + kk[None, :], mask=m_ok[:, None] & (kk[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    tl.store(y_ptr + offs_m[:, None] * s_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, block_n: int, block_k: int, warps: int,
                stages: int) -> None:
    n, k = w.shape
    _skinny_gemm_kernel[(triton.cdiv(n, block_n),)](
        x, w, y, x.shape[0], k, n, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(x.shape[0])), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)


def triton_gemv(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, block_n: int, block_k: int, warps: int,
                stages: int) -> None:
    n, k = w.shape
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, y, k, n, x.stride(0), w.stride(0), y.stride(0),
                                             ROWS=x.shape[0], ROWS_P=triton.next_power_of_2(x.shape[0]), BLOCK_N=block_n, BLOCK_K=block_k,
                                             num_warps=warps, num_stages=stages)


def linears(rows: list[int], bw: float, shapes: str) -> None:
    from ad_runtime.kernels.triton import gemv as ours

    print(f"\n## linear layers of {shapes} (bf16), us per call; roofline = weight bytes / copy bandwidth")
    print("| layer | rows | roofline us | cuBLAS us (% roofline) | best Triton GEMV (<= 4 rows) or skinny GEMM us "
          "(% roofline) [config] "
          "| ad_runtime gemv us (% roofline) [its config] |")
    print("|---|---|---|---|---|---|")
    configs = [(bn, bk, 4, 3) for bn in (4, 8, 16, 32) for bk in (256, 512)] + [(16, 256, 8, 4), (32, 512, 8, 4)]
    skinny = [(bn, bk, w, st) for bn in (16, 32, 64) for bk in (64, 128, 256) for w in (4,) for st in (3, 4, 6)
              if bn * bk * st * 2 <= 160 * 1024]
    for name, n, k in LINEARS[shapes]:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        roof = n * k * 2 / bw * 1e6
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, w)
            cublas = graph_us(lambda: torch.nn.functional.linear(x, w))
            best = (float("inf"), None)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            kernel = triton_gemv if m <= 4 else skinny_gemm
            for cfg in configs if m <= 4 else skinny:
                try:
                    kernel(x, w, y, *cfg)
                    torch.cuda.synchronize()
                    if not torch.allclose(y.float(), ref.float(), atol=2e-2, rtol=2e-2):
                        print(f"  (config {cfg} gave a wrong result)")
                        continue
                    us = graph_us(lambda: kernel(x, w, y, *cfg), reps=10, replays=5)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                    print(f"  (config {cfg}: {type(e).__name__})")
                    continue
                best = min(best, (us, cfg), key=lambda t: t[0])
            tri = f"{best[0]:.1f} ({100 * roof / best[0]:.0f}%) {best[1]}" if best[1] else "-"
            mine = "-"
            if m == 1:  # the kernel gemv_decode_linear puts in one-row graphs, with its own launch config
                torch.testing.assert_close(ours.gemv(x, w, None).float(), ref.float(), atol=2e-2, rtol=2e-2)
                us = graph_us(lambda: ours.gemv(x, w, None))
                cfg = ours.launch_config(n, k, x.device)
                mine = f"{us:.1f} ({100 * roof / us:.0f}%) [{cfg['BLOCK_N']}x{cfg['BLOCK_K']}]"
            print(f"| {name} {n}x{k} | {m} | {roof:.1f} | {cublas:.1f} ({100 * roof / cublas:.0f}%) | {tri} | {mine} |")
        del w


def attention(rows: list[int], bw: float, ctx: int, sweep: bool = False, page: int = 16,
              flashinfer_columns: bool = True) -> None:

    from ad_runtime.kernels.triton import paged_decode as pa

    n_heads, n_kv, d = 32, 8, 128
    print(f"\n## decode attention, one layer, context {ctx}, page {page}; roofline = K+V bytes / copy bandwidth")
    print("| rows | roofline us | FlashInfer tc (auto) | FlashInfer tc fa2 | FlashInfer cuda-cores | Triton split-KV |")
    print("|---|---|---|---|---|---|")
    for b in rows:
        pages = -(-ctx // page)
        total = b * pages
        kc = torch.randn(total, page, n_kv, d, device="cuda", dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(b, n_heads, d, device="cuda", dtype=torch.bfloat16)
        indptr = torch.arange(0, total + 1, pages, device="cuda", dtype=torch.int32)
        indices = torch.arange(total, device="cuda", dtype=torch.int32)
        last = torch.full((b,), ctx - (pages - 1) * page, device="cuda", dtype=torch.int32)
        roof = 2 * b * ctx * n_kv * d * 2 / bw * 1e6
        cells = []
        for kw in (dict(use_tensor_cores=True), dict(use_tensor_cores=True, backend="fa2"),
                   dict(use_tensor_cores=False)):
            if not flashinfer_columns:  # FlashInfer JIT-compiles each variant on a fresh machine (minutes)
                cells.append(float("nan"))
                continue
            import flashinfer

            ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
            wrap = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                ws, "NHD", use_cuda_graph=True, paged_kv_indptr_buffer=indptr.clone(),
                paged_kv_indices_buffer=indices.clone(), paged_kv_last_page_len_buffer=last.clone(), **kw)
            wrap.plan(indptr, indices, last, n_heads, n_kv, d, page, q_data_type=torch.bfloat16,
                      kv_data_type=torch.bfloat16)
            out = torch.empty_like(q)
            cells.append(graph_us(lambda: wrap.run(q, (kc, vc), out=out)))
        table = indices.view(b, pages)
        seq_len = torch.ones(b, device="cuda", dtype=torch.int32)
        pos = torch.full((b,), ctx - 1, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        occ = pa.occupancy_num_splits(b, n_kv, ctx, torch.cuda.get_device_properties(0).multi_processor_count)
        for splits in sorted({occ, 1, 8, 16, 32}):
            us = graph_us(lambda: pa.decode_attention(q, kc, vc, seq_len, pos, table, out=out, num_splits=splits))
            cells.append((splits, us))
        best_tri = min(cells[3:], key=lambda t: t[1])
        print(f"| {b} | {roof:.1f} | " + " | ".join(f"{c:.1f}" for c in cells[:3])
              + f" | {best_tri[1]:.1f} (splits {best_tri[0]}, occupancy {occ}; "
              + ", ".join(f"{s}:{u:.1f}" for s, u in cells[3:]) + ") |")
        if sweep:
            launches = [pa.DecodeLaunch(n, w, st) for n in (32, 64, 128) for w in (4, 8) for st in (2, 3, 4)]
            timed = []
            # The occupancy rule's split count and its neighbours: whether another split count with its best
            # tile beats the rule's.
            for splits in sorted({max(1, occ // 2), occ, 2 * occ, 4 * occ}):
                for la in launches:
                    try:
                        timed.append((graph_us(lambda: pa.decode_attention(q, kc, vc, seq_len, pos, table, out=out,
                                                                           num_splits=splits, launch=la)), splits, la))
                    except Exception as e:  # out of shared memory or registers for this tile
                        print(f"  splits {splits} launch {la}: {type(e).__name__}")
            timed.sort(key=lambda t: t[0])
            print(f"  rows {b} ctx {ctx} (occupancy splits {occ}), best launches: "
                  + "; ".join(f"{u:.1f} us splits {s} n{la.block_n} w{la.num_warps} s{la.num_stages}"
                              for u, s, la in timed[:8]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 32])
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--skip-linears", action="store_true")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--skip-flashinfer", action="store_true",
                   help="leave out FlashInfer's columns (its kernels JIT-compile for minutes on a fresh machine)")
    p.add_argument("--sweep-launch", action="store_true", help="time the Triton decode kernel's launch configs")
    p.add_argument("--page", type=int, default=16, help="tokens per KV-cache page (the engine's default: 64)")
    p.add_argument("--shapes", choices=sorted(LINEARS), default="llama3.1-8b", help="whose linear layers")
    a = p.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
    if not a.skip_linears:
        linears(a.rows, bw, a.shapes)
    if not a.skip_attention:
        attention(a.rows, bw, a.ctx, a.sweep_launch, a.page, not a.skip_flashinfer)


if __name__ == "__main__":
    main()
