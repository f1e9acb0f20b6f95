"""Kernel table of captured decode steps: what the GPU runs per token, at several batch sizes, beside the roofline.

    python benchmarks/gpu/decode_profile.py --preset llama3.1-8b --dtype bfloat16 --batch-sizes 1 64 256@128 --isl 1024

For each batch size: B prompts of ISL random tokens are prefilled, then STEPS decode steps run under
torch.profiler. Printed: step time (CUDA events), the roofline (weights + KV bytes over the measured copy
bandwidth) and its share, kernels per step, the share of wall time the GPU ran kernels, and the top kernels
(name, calls per step, us per step, share of kernel time).
"""

import argparse
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_vs_ad import PRESETS, machine_name  # noqa: E402 - the benchmarks folder is no package
from throughput import (  # noqa: E402
    add_build_options, copy_bandwidth, kv_bytes_per_token, make_llm, model_path, weight_bytes,
)


def prefill(llm, batch: int, isl: int, rng: random.Random) -> list:
    from ad_runtime import SamplingParams

    eng = llm.engine
    sp = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    reqs = [eng.add_request([rng.randrange(100, llm.vocab_size) for _ in range(isl)], sp) for _ in range(batch)]
    while any(not r.output_token_ids for r in reqs):
        eng.step()
    return reqs


def profile_decode(llm, batch: int, isl: int, steps: int, rng: random.Random, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    eng = llm.engine
    reqs = prefill(llm, batch, isl, rng)
    for _ in range(5):  # warm-up decode steps
        eng.step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    end.record()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) * 1e3 / steps
    step_ms = start.elapsed_time(end) / steps
    phases = host_phases(eng, steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name].append(ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total)
    total_us = sum(sum(v) for v in kernels.values())
    table = sorted(((n, len(v) / steps, sum(v) / steps) for n, v in kernels.items()), key=lambda r: -r[2])
    replay = graph_replay_ms(eng, batch, steps)
    for r in reqs:
        eng.abort(r, "profiling done")
    ctx = isl + 5 + steps
    return {"batch": batch, "step_ms": step_ms, "wall_ms": wall_ms, "kernel_us": total_us / steps,
            "kernels_per_step": sum(len(v) for v in kernels.values()) / steps, "ctx": ctx, "table": table[:top],
            "replay_ms": replay, "phases": phases}


def host_phases(eng, steps: int) -> dict:
    """The engine's StepTimer over STEPS more decode steps: host ms per phase and the GPU's busy ms per step."""
    from ad_runtime.executor.step_timer import StepTimer

    eng.timer = StepTimer(eng.runner.device)
    for _ in range(steps):
        eng.step()
    summary = eng.timer.summary().get("decode", {})
    eng.timer = None
    return summary


def host_cpu() -> str:
    """Which core the process runs on and how many it may use (host speed differed between processes)."""
    import os

    try:
        core = open("/proc/self/stat").read().rsplit(")", 1)[1].split()[36]
    except (OSError, IndexError):
        core = "?"
    return f"host: pid {os.getpid()} on core {core} of {len(os.sched_getaffinity(0))} allowed"


def graph_replay_ms(eng, batch: int, steps: int) -> float | None:
    """GPU time of one decode step without the engine: the captured graph of this batch replayed back to back on
    the last step's inputs (the step time above is the larger of this and the host's time per step)."""
    from ad_runtime.compile.cuda_graph import CudaGraphModel

    module = getattr(getattr(eng, "runner", None), "module", None)
    models = [m for m in module.modules() if isinstance(m, CudaGraphModel)] if module is not None else []
    rows = next((r for m in models for r in sorted(m.graphs) if r >= batch), None)
    if rows is None:
        return None
    graph = next(m.graphs[rows] for m in models if rows in m.graphs)
    for _ in range(10):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(4 * steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (4 * steps)


def sm_clock() -> str:
    """The SM clock nvidia-smi reads now (the card's clocks move with its load; printed beside each timing)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "SM clock unknown"
    return f"SM clock now/max {out}" if out else "SM clock unknown"


def profile_host(llm, batch: int, isl: int, steps: int, rng: random.Random, top: int) -> None:
    """Host functions of STEPS decode steps by own time (cProfile): where a step's Python goes when the GPU waits."""
    import cProfile
    import pstats

    eng = llm.engine
    reqs = prefill(llm, batch, isl, rng)
    for _ in range(5):
        eng.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        eng.step()
    prof.disable()
    torch.cuda.synchronize()
    for r in reqs:
        eng.abort(r, "profiling done")
    print(f"\nhost profile, batch {batch}, {steps} decode steps (cProfile adds its own overhead):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def profile_prefill(llm, isl: int, rng: random.Random, top: int, repeat: int = 8, cprofile: bool = False) -> None:
    """Wall time from submitting one ISL-token prompt to its first token (what TTFT holds besides HTTP), and the
    host ops of that step by self CPU time: where a prefill step's host time goes."""
    from torch.profiler import ProfilerActivity, profile

    from ad_runtime import SamplingParams

    eng = llm.engine
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def first_token() -> float:
        t = time.perf_counter()
        req = eng.add_request([rng.randrange(100, llm.vocab_size) for _ in range(isl)], sp)
        while not req.output_token_ids:
            eng.step()
        while eng.has_unfinished:
            eng.step()
        return (time.perf_counter() - t) * 1e3

    times = sorted(first_token() for _ in range(repeat))
    print(f"\none prompt of {isl} tokens to its first token (engine alone, {repeat} times): median "
          f"{times[len(times) // 2]:.1f} ms, "
          f"min {times[0]:.1f} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        first_token()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=70))
    if cprofile:  # the Python functions of the same steps, by cumulative and by own time
        import cProfile
        import pstats

        cp = cProfile.Profile()
        cp.enable()
        for _ in range(repeat):
            first_token()
        cp.disable()
        print(f"\nhost functions of {repeat} prompts of {isl} tokens to their first token (cProfile adds its own overhead):")
        pstats.Stats(cp).sort_stats("cumulative").print_stats(3 * top)
        pstats.Stats(cp).sort_stats("tottime").print_stats(top)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3.1-8b")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-sizes", nargs="+", default=["1", "64"],
                   help="B or B@ISL (this batch size with prompts of ISL tokens instead of --isl)")
    p.add_argument("--isl", type=int, default=1024)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--compile-backend", default="auto")
    p.add_argument("--attn-backend", default="auto")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--max-seq-len", type=int, default=2048, help="raised to what --isl and --steps need")
    p.add_argument("--prefill-profile", type=int, default=0, metavar="ISL",
                   help="also time one ISL-token prompt to its first token and profile that step's host ops")
    p.add_argument("--prefill-repeat", type=int, default=8,
                   help="prompts timed by --prefill-profile (more give a sampling profiler more to see)")
    p.add_argument("--prefill-cprofile", action="store_true",
                   help="with --prefill-profile: also profile the prompts' host functions (cProfile)")
    add_build_options(p)
    p.add_argument("--host-profile", type=int, default=0, metavar="B",
                   help="also profile the host functions of decode steps at batch size B (cProfile)")
    p.add_argument("--model-dir", default=None,
                   help="the folder of an earlier throughput.py run (same settings): its build cache entry is used")
    args = p.parse_args()
    runs = [(int(b), int(isl or args.isl)) for b, _, isl in (x.partition("@") for x in args.batch_sizes)]
    if max(b for b, _ in runs) > args.max_batch_size:
        p.error(f"--batch-sizes {max(b for b, _ in runs)} exceeds --max-batch-size {args.max_batch_size}")

    bw = copy_bandwidth()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        path, random_weights = model_path(args, tmp)
        t = time.perf_counter()
        longest = max(isl for _, isl in runs)
        llm = make_llm(path, random_weights, args, max(args.max_seq_len, longest + 3 * args.steps + 16))
        print(f"build: {time.perf_counter() - t:.1f} s; " + "; ".join(r.summary() for r in llm.build_reports))
        wbytes, kv_tok = weight_bytes(llm), kv_bytes_per_token(llm)
        print(f"machine: {machine_name()} | {args.preset} {args.dtype} | weights {wbytes / 1e9:.2f} GB | "
              f"copy bandwidth {bw / 1e12:.2f} TB/s")
        for b, isl in runs:
            r = profile_decode(llm, b, isl, args.steps, rng, args.top)
            roof = (wbytes + b * r["ctx"] * kv_tok) / bw * 1e3
            print(f"\nbatch {b}, context ~{r['ctx']}: decode step {r['step_ms']:.3f} ms (host wall {r['wall_ms']:.3f}),"
                  f" roofline {roof:.3f} ms -> {100 * roof / r['step_ms']:.0f}% of it | {r['kernels_per_step']:.0f} kernels"
                  f"/step, busy {100 * r['kernel_us'] / 1e3 / r['step_ms']:.0f}% of the step")
            if r["replay_ms"] is not None:
                print(f"  the captured graph replayed alone: {r['replay_ms']:.3f} ms a step ({100 * roof / r['replay_ms']:.0f}%"
                      f" of the roofline); the rest of the step above is host time | {sm_clock()}")
            ph = r["phases"]
            if ph:
                print("  host ms per step: " + ", ".join(f"{k} {ph[f'{k}_ms']:.3f}" for k in
                                                       ("schedule", "forward", "sample", "post"))
                      + f" = {ph['host_ms']:.3f}; GPU busy {ph.get('gpu_ms', 0):.3f} ms, idle "
                      f"{100 * ph.get('gpu_idle_share', 0):.0f}% between steps | {host_cpu()}")
            print(f"  {'kernel':90s} {'calls':>6s} {'us/step':>9s} {'share':>6s}")
            for name, calls, us in r["table"]:
                print(f"  {name[:90]:90s} {calls:6.1f} {us:9.1f} {100 * us / r['kernel_us']:5.1f}%")
        if args.host_profile:
            profile_host(llm, args.host_profile, runs[0][1], args.steps, rng, args.top)
        if args.prefill_profile:
            profile_prefill(llm, args.prefill_profile, rng, args.top, args.prefill_repeat, args.prefill_cprofile)
        llm.shutdown()


if __name__ == "__main__":
    main()
