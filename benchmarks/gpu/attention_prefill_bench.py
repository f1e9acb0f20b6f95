"""Our Triton context (prefill) attention kernel under several tile sizes and launches, on one layer of
Llama-3.1-8B shapes over a paged cache: which launch computes causal attention fastest.

    python benchmarks/gpu/attention_prefill_bench.py

Cases: whole prompts (ctx 0) and chunks over a cached context. Each launch is timed with CUDA events and printed
with the TFLOP/s of the causal attention it computes (QK^T and PV over the keys each query sees) and its largest
difference from the first launch's output; the first case is also checked against torch's SDPA.
"""

import argparse
import sys
from pathlib import Path

import torch
from ad_runtime.kernels.triton import paged_attention as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_decode_bench import bench  # noqa: E402 - the benchmarks folder is no package

LAUNCHES = [  # (block_m, block_n, num_warps, num_stages, split_full, pack_gqa); the first is the old default
    (64, 32, 4, 3, True, False), (64, 64, 4, 2, True, False), (128, 128, 8, 2, True, False),
    (64, 32, 4, 3, True, True), (64, 64, 4, 2, True, True), (64, 64, 4, 3, True, True),
    (128, 32, 4, 3, True, True), (128, 32, 8, 3, True, True), (128, 64, 4, 3, True, True),
    (128, 64, 8, 2, True, True), (128, 64, 8, 3, True, True), (128, 128, 8, 2, True, True),
    (256, 64, 8, 2, True, True),
]


def paged_case(num: int, new: int, ctx: int, heads: int, kv_heads: int, d: int, page: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    pages_per = -(-(ctx + new) // page)
    k_cache = torch.randn(num * pages_per + 1, page, kv_heads, d, dtype=dt, device=dev)
    v_cache = torch.randn_like(k_cache)
    page_table = torch.randperm(num * pages_per, device=dev, dtype=torch.int32).view(num, pages_per)
    q = torch.randn(num * new, heads, d, dtype=dt, device=dev)
    cu = torch.arange(0, num * new + 1, new, dtype=torch.int32, device=dev)
    input_pos = torch.full((num,), ctx, dtype=torch.int32, device=dev)
    # keys seen: query i of a chunk sees ctx + i + 1 of them
    flops = 4 * heads * d * num * (new * ctx + new * (new + 1) / 2)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, cu=cu, input_pos=input_pos, page_table=page_table,
                max_q_len=new, flops=flops)


def run(case: dict, launch: pa.PrefillLaunch) -> torch.Tensor:
    return pa.context_attention(case["q"], case["k_cache"], case["v_cache"], case["cu"], case["input_pos"],
                                case["page_table"], max_q_len=case["max_q_len"], launch=launch)


def flashinfer_runner(case: dict, num: int, new: int, ctx: int, heads: int, kv_heads: int, d: int, page: int):
    """FlashInfer's paged prefill on the same case (planned once, outside the timing): the speed to reach."""
    import flashinfer

    total = ctx + new
    pages_per = case["page_table"].shape[1]
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"), "NHD")
    w.plan(case["cu"], torch.arange(0, num * pages_per + 1, pages_per, dtype=torch.int32, device="cuda"),
           case["page_table"].flatten(), torch.full((num,), (total - 1) % page + 1, dtype=torch.int32, device="cuda"),
           heads, kv_heads, d, page, causal=True, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    return lambda: w.run(case["q"], (case["k_cache"], case["v_cache"]))


def sdpa_reference(case: dict, num: int, new: int, ctx: int) -> torch.Tensor:
    outs = []
    for b in range(num):
        pages = case["page_table"][b]
        k = case["k_cache"][pages].flatten(0, 1)[: ctx + new].transpose(0, 1)  # [kv, keys, d]
        v = case["v_cache"][pages].flatten(0, 1)[: ctx + new].transpose(0, 1)
        q = case["q"][b * new : (b + 1) * new].transpose(0, 1)  # [h, new, d]
        mask = torch.arange(ctx + new, device=q.device)[None, :] <= (ctx + torch.arange(new, device=q.device))[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["8x1024+0", "1x8192+0", "8x512+3584", "32x256+0"],
                   help="NUMxNEW+CTX: NUM sequences of NEW new tokens over CTX cached ones")
    p.add_argument("--page", type=int, default=64)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--flashinfer", action="store_true", help="also time FlashInfer's paged prefill (JIT on first use)")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name(0)} | heads {args.heads}, kv heads {args.kv_heads}, head dim "
          f"{args.head_dim}, pages of {args.page}, bf16 | default launch for long chunks: "
          f"{pa.prefill_launch(1024, args.head_dim)}")
    for i, spec in enumerate(args.cases):
        shape, _, ctx = spec.partition("+")
        num, new = (int(x) for x in shape.split("x"))
        ctx = int(ctx or 0)
        case = paged_case(num, new, ctx, args.heads, args.kv_heads, args.head_dim, args.page)
        print(f"\n{num} x {new} new tokens over {ctx} cached: {case['flops'] / 1e12:.2f} TFLOP")
        ref = None
        if i == 0:
            ref = sdpa_reference(case, num, new, ctx)
            print(f"  {'torch SDPA (reference)':40s} {bench(lambda: sdpa_reference(case, num, new, ctx), 3):9.1f} us")
        if args.flashinfer:
            fi = flashinfer_runner(case, num, new, ctx, args.heads, args.kv_heads, args.head_dim, args.page)
            fo, us = fi(), bench(fi, args.runs)
            diff = f"  vs SDPA {(fo.float() - ref.float()).abs().max().item():.1e}" if ref is not None else ""
            print(f"  {'FlashInfer prefill':40s} {us:9.1f} us  {case['flops'] / us / 1e6:6.0f} TFLOP/s{diff}")
        first = None
        for spec in LAUNCHES:
            launch = pa.PrefillLaunch(*spec)
            try:
                out = run(case, launch)
                us = bench(lambda: run(case, launch), args.runs)
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: reported, the sweep goes on
                print(f"  {str(tuple(launch)):40s} failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
                continue
            first = out if first is None else first
            err = (out.float() - first.float()).abs().max().item()
            line = f"  {str(tuple(launch)):40s} {us:9.1f} us  {case['flops'] / us / 1e6:6.0f} TFLOP/s  max|diff| {err:.1e}"
            if ref is not None:
                line += f"  vs SDPA {(out.float() - ref.float()).abs().max().item():.1e}"
            print(line)


if __name__ == "__main__":
    main()
