"""Decode-sized products (8-64 rows) of Llama-3.1-8B's linears: cuBLAS against ad_runtime's skinny Triton GEMM.

    python benchmarks/gpu/skinny_gemm_bench.py --rows 8 32 64            # each linear, a sweep of the kernel's tiles
    python benchmarks/gpu/skinny_gemm_bench.py --layer --rows 8 16 32 64  # whole layers, as the engine runs them

Unlike `small_batch_kernels.py` (one weight multiplied 20 times, so it sits in L2 after the first), every call here
reads a different copy of the weight, as a decode step reads each layer's weight once: a chain of calls over copies
whose bytes together exceed twice the L2 is captured in one CUDA graph and replayed. Consecutive kernels of the chain
overlap as they would in a step (PDL for the Triton kernels, none for cuBLAS). The roofline is the weight bytes over
the measured copy bandwidth. The kernel: each program owns block_n output features over the whole K (no split-K
reduce) and multiplies the rows' tile on tensor cores; for gate_up it also writes silu(gate) * up (cuBLAS's figure
for it is the GEMM and our activation kernel). Launches are (block_n, block_k, warps, stages). `--layer` chains a
layer's add_rmsnorm and products through the package's dispatch (`skinny_gemm.takes`), which is how the engine's
kernels meet: it is the figure that decided the kernel's alignment specialisation and its late PDL trigger."""

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_batch_kernels import graph_us  # noqa: E402
from throughput import copy_bandwidth  # noqa: E402

SHAPES = [("qkv", 6144, 4096, False), ("o_proj", 4096, 4096, False), ("gate_up+silu", 28672, 4096, True),
          ("down", 4096, 14336, False), ("lm_head", 128256, 4096, False)]
LAUNCHES = [(bn, bk, 4, st) for bn in (16, 32, 64) for bk in (128, 256) for st in (3, 4)]


def chain_us(fn, copies: int) -> float:
    """Microseconds per call of fn(i) over copies i = 0..copies-1, captured (twice over) as one graph and replayed."""
    return graph_us(lambda: [fn(i) for i in range(copies)], reps=2) / copies


def tiles(m: int, cfg: tuple) -> dict:
    """skinny_linear's `launch` for a (block_n, block_k, warps, stages) sweep entry at m rows."""
    bn, bk, warps, stages = cfg
    return dict(BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                num_stages=stages)


def layer_chain(rows: list[int], copies: int = 4) -> None:
    """One Llama-3.1-8B layer's products as the engine runs them (add_rmsnorm, qkv, o_proj, add_rmsnorm, gate_up
    with its activation, down; attention left out) over `copies` layers' weights: cuBLAS against the package's
    skinny GEMM (where `takes` picks it): with PDL (its dependents' trigger where the package puts it, always
    after its K loop, or always at its start), for qkv too, without PDL, and not specialised on its pointers'
    alignment."""
    import os

    from ad_runtime.kernels.triton import rmsnorm, skinny_gemm
    from ad_runtime.kernels.triton.gemv import silu_mul

    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    layers = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for n, k in shapes] for _ in range(copies)]
    norm_w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
    roof = sum(n * k * 2 for n, k in shapes) / copy_bandwidth() * 1e6
    aligned = skinny_gemm._skinny_kernel
    unaligned = triton.jit(do_not_specialize=["M"], do_not_specialize_on_alignment=["x_ptr", "y_ptr"])(aligned.fn)

    def lin(x, w, swiglu, skinny, early, force, gate_up=None):
        if skinny and (force or skinny_gemm.takes(x, w, swiglu)):
            n = w.shape[0] // 2 if swiglu else w.shape[0]
            launch = skinny_gemm.launch_config(n, w.shape[1], x.shape[0], swiglu)
            if early is not None:  # the dependents' trigger at the start (True) or after the K loop (False) always
                launch["TRIGGER_EARLY"] = early
            if swiglu and gate_up:  # gate/up's launch changed (fewer stages: two programs an SM, one wave)
                launch.update(gate_up)
            return skinny_gemm.skinny_linear(x, w, None, swiglu, launch=launch)
        y = torch.nn.functional.linear(x, w)
        return silu_mul(y) if swiglu else y

    print("| rows | layer roofline us | variant | us per layer (%) |")
    print("|---|---|---|---|")
    for m in rows:
        x0 = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        res = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)

        def layer(i, *how):
            w_qkv, w_o, w_gu, w_down = layers[i]
            h, r = rmsnorm.add_rmsnorm(x0, res, norm_w, 1e-5)
            o = lin(lin(h, w_qkv, False, *how)[:, :4096].contiguous(), w_o, False, *how)
            h, r = rmsnorm.add_rmsnorm(o, r, norm_w, 1e-5)
            return lin(lin(h, w_gu, True, *how), w_down, False, *how)

        # (label, skinny, trigger early (None: the package's choice), skinny for every linear, PDL, kernel)
        for label, skinny, early, force, pdl, kernel, *gate_up in [
            ("cuBLAS", False, None, False, "1", aligned),
            ("skinny, PDL (next kernel launched at the start where the grid is one wave)", True, None, False, "1",
             aligned),
            ("skinny, PDL, next kernel launched after the K loop always", True, False, False, "1", aligned),
            ("skinny, PDL, next kernel launched at the start always", True, True, False, "1", aligned),
            ("skinny everywhere (qkv too), PDL", True, None, True, "1", aligned),
            ("skinny, gate_up in 3 stages, triggering at its start", True, None, False, "1", aligned,
             {"num_stages": 3, "TRIGGER_EARLY": True}),
            ("skinny, gate_up in 2 stages, triggering at its start", True, None, False, "1", aligned,
             {"num_stages": 2, "TRIGGER_EARLY": True}),
            ("skinny, gate_up in 3 stages", True, None, False, "1", aligned, {"num_stages": 3}),
            ("skinny, no PDL", True, None, False, "0", aligned),
            ("skinny, x not alignment-specialised, PDL", True, None, False, "1", unaligned),
        ]:
            os.environ["AUTODEPLOY_TRITON_PDL"] = pdl
            skinny_gemm._skinny_kernel = kernel
            us = chain_us(lambda i: layer(i, skinny, early, force, *gate_up), copies)
            print(f"| {m} | {roof:.1f} | {label} | {us:.1f} ({100 * roof / us:.0f}%) |", flush=True)
        skinny_gemm._skinny_kernel, os.environ["AUTODEPLOY_TRITON_PDL"] = aligned, "1"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--top", type=int, default=4, help="launches shown per shape and row count")
    p.add_argument("--layer", action="store_true", help="time whole layers' products (the package's kernels) instead")
    args = p.parse_args()
    if args.layer:
        return layer_chain(args.rows)
    from ad_runtime.kernels.triton.gemv import silu_mul
    from ad_runtime.kernels.triton.skinny_gemm import skinny_linear

    bw = copy_bandwidth()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"# {torch.cuda.get_device_name(0)}: copy bandwidth {bw / 1e12:.2f} TB/s, L2 {l2 / 2**20:.0f} MiB")
    print("| linear | rows | roofline us | cuBLAS us (%) | best launches us (%) |")
    print("|---|---|---|---|---|")
    for name, n_w, k, swiglu in SHAPES:
        nbytes = n_w * k * 2
        copies = max(2, -(-4 * l2 // nbytes))
        ws = [torch.randn(n_w, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        roof = nbytes / bw * 1e6
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, ws[0])
            if swiglu:
                gate, up = ref.float().chunk(2, dim=-1)
                ref = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)
                cublas = chain_us(lambda i: silu_mul(torch.nn.functional.linear(x, ws[i])), copies)
            else:
                cublas = chain_us(lambda i: torch.nn.functional.linear(x, ws[i]), copies)
            times = []
            for cfg in LAUNCHES:
                try:
                    y = skinny_linear(x, ws[0], None, swiglu, launch=tiles(m, cfg))
                    torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=3e-2)
                    times.append((chain_us(lambda i: skinny_linear(x, ws[i], None, swiglu, launch=tiles(m, cfg)),
                                           copies), cfg))
                except Exception as e:  # noqa: BLE001 - a launch that does not compile or fit is reported and skipped
                    print(f"  ({name} rows {m} launch {cfg}: {type(e).__name__}: {str(e)[:80]})")
            best = ", ".join(f"{t:.1f} ({100 * roof / t:.0f}%) {cfg}" for t, cfg in sorted(times)[:args.top])
            print(f"| {name} {n_w}x{k} | {m} | {roof:.1f} | {cublas:.1f} ({100 * roof / cublas:.0f}%) | "
                  f"{best} |", flush=True)


if __name__ == "__main__":
    main()
