"""FlashInfer decode attention variants on one layer of Llama-3.1-8B shapes: which kernel reads the KV cache fastest.

    python benchmarks/gpu/attention_decode_bench.py --batch-sizes 1 64 256 --ctx 1024

Each variant is planned once and timed over many runs with CUDA events; printed beside the KV bytes' roofline
(one layer's K and V over the measured copy bandwidth) and checked against the first variant's output.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import copy_bandwidth  # noqa: E402


def variants() -> dict[str, dict]:
    return {
        "decode tensor-cores (auto backend)": dict(use_tensor_cores=True),
        "decode tensor-cores fa2": dict(use_tensor_cores=True, backend="fa2"),
        "decode cuda-cores": dict(use_tensor_cores=False),
    }


def bench(fn, runs: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(runs):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / runs


def main() -> None:
    import flashinfer

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--page", type=int, default=64)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--runs", type=int, default=50)
    args = p.parse_args()
    bw = copy_bandwidth()
    dev, dt = torch.device("cuda"), torch.bfloat16
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device=dev)
    print(f"flashinfer {flashinfer.__version__} | {torch.cuda.get_device_name(0)} | copy bandwidth {bw / 1e12:.2f} TB/s")
    for b in args.batch_sizes:
        pages_per = -(-args.ctx // args.page)
        n_pages = b * pages_per + 1
        k = torch.randn(n_pages, args.page, args.kv_heads, args.head_dim, dtype=dt, device=dev)
        v = torch.randn_like(k)
        indices = torch.randperm(n_pages - 1, device=dev, dtype=torch.int32)[: b * pages_per]
        indptr = torch.arange(0, b * pages_per + 1, pages_per, dtype=torch.int32, device=dev)
        last = torch.full((b,), (args.ctx - 1) % args.page + 1, dtype=torch.int32, device=dev)
        q = torch.randn(b, args.heads, args.head_dim, dtype=dt, device=dev)
        kv_bytes = b * args.ctx * args.kv_heads * args.head_dim * 2 * k.element_size()
        roof_us = kv_bytes / bw * 1e6
        ref = None
        print(f"\nbatch {b}, context {args.ctx}: KV {kv_bytes / 1e6:.1f} MB per layer, roofline {roof_us:.1f} us")
        for name, kw in variants().items():
            try:
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", **kw)
                w.plan(indptr, indices, last, args.heads, args.kv_heads, args.head_dim, args.page,
                       q_data_type=dt, kv_data_type=dt)
                out = w.run(q, (k, v))
                us = bench(lambda: w.run(q, (k, v)), args.runs)
            except Exception as e:  # noqa: BLE001 - a variant this version lacks is reported, not fatal
                print(f"  {name:40s} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                continue
            ref = out if ref is None else ref
            err = (out.float() - ref.float()).abs().max().item()
            print(f"  {name:40s} {us:9.1f} us  {100 * roof_us / us:5.0f}% of roofline  max|diff| {err:.2e}")


if __name__ == "__main__":
    main()
