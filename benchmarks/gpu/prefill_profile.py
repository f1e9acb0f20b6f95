"""Kernel table of full prefill steps (max_num_tokens prompt tokens each) beside their compute ceiling.

    python benchmarks/gpu/prefill_profile.py --preset llama3.1-8b --dtype bfloat16 --isl 1024 --steps 4

A batch of 1024-token prompts spends most of its time in steps like these (1024/128 x 32: 5 mixed steps took
0.73 s and 127 decode steps 0.74 s, benchmarks/README.md). Each step holds max_num_tokens // ISL whole prompts
and samples one token for each. Printed: GPU ms per step (CUDA events), the model's FLOPs per step (the linears
of every prompt token, causal attention, the LM head of the last token) and the TFLOP/s they come to; the same
step's linear layers timed alone with torch.mm at its token count (what cuBLAS gives at these shapes on this card,
now); and the top kernels (name, calls per step, ms per step, share of kernel time).
"""

import argparse
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_decode_bench import bench  # noqa: E402 - the benchmarks folder is no package
from decode_profile import sm_clock  # noqa: E402
from hf_vs_ad import PRESETS, machine_name  # noqa: E402
from throughput import add_build_options, make_llm, model_path  # noqa: E402


def linear_shapes(cfg: dict) -> list[tuple[str, int, int]]:
    """(name, in features, out features) of one decoder layer's linears, gate and up merged as the graph has them."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads
    return [("qkv", h, (heads + 2 * kv) * d), ("o_proj", heads * d, h), ("gate_up", h, 2 * inter),
            ("down", inter, h)]


def step_flops(cfg: dict, prompts: int, isl: int) -> float:
    """FLOPs of one step that prefills `prompts` whole prompts of `isl` tokens (multiply-add = 2)."""
    layers = cfg["num_hidden_layers"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    linears = sum(2 * k * n for _, k, n in linear_shapes(cfg)) * layers * prompts * isl
    attention = 4 * cfg["num_attention_heads"] * d * (isl * (isl + 1) / 2) * layers * prompts  # QK^T and PV, causal
    head = 2 * cfg["hidden_size"] * cfg["vocab_size"] * prompts
    return linears + attention + head


def gemms_alone_ms(cfg: dict, tokens: int, dtype: torch.dtype, reps: int = 10) -> dict[str, float]:
    """ms per step of each linear at `tokens` rows, torch.mm on random operands, times the layer count."""
    out = {}
    for name, k, n in linear_shapes(cfg):
        a = torch.randn(tokens, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        out[name] = bench(lambda: torch.mm(a, w.t()), reps) / 1e3 * cfg["num_hidden_layers"]
        del a, w
    return out


def run_steps(llm, prompts: list[list[int]]) -> int:
    """Prefill `prompts` (one new token each) through the engine; returns the number of engine steps taken."""
    from ad_runtime import SamplingParams

    eng = llm.engine
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for p in prompts:
        eng.add_request(p, sp)
    steps = 0
    while eng.has_unfinished:
        eng.step()
        steps += 1
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3.1-8b")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--isl", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4, help="full prefill steps timed (and as many profiled)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--compile-backend", default="auto")
    p.add_argument("--attn-backend", default="auto")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--max-seq-len", type=int, default=2048)
    add_build_options(p)
    p.add_argument("--model-dir", default=None, help="the folder of an earlier throughput.py run (same settings)")
    args = p.parse_args()
    from torch.profiler import ProfilerActivity, profile

    per_step = args.max_num_tokens // args.isl
    if per_step < 1:
        p.error(f"--isl {args.isl} exceeds --max-num-tokens {args.max_num_tokens}: no step holds a whole prompt")
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        path, random_weights = model_path(args, tmp)
        cfg = json.loads((Path(path) / "config.json").read_text())
        t = time.perf_counter()
        llm = make_llm(path, random_weights, args, max(args.max_seq_len, args.isl + 8))
        print(f"build: {time.perf_counter() - t:.1f} s; " + "; ".join(r.summary() for r in llm.build_reports))

        def batch() -> list[list[int]]:  # new random prompts each time: nothing comes from the prefix cache
            return [[rng.randrange(100, llm.vocab_size) for _ in range(args.isl)] for _ in range(per_step * args.steps)]

        run_steps(llm, batch())  # warm-up: the piecewise graphs of this token count, cuBLAS, the allocator
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        steps = run_steps(llm, batch())
        end.record()
        torch.cuda.synchronize()
        step_ms = start.elapsed_time(end) / args.steps  # per full step (an overlapped engine takes one step more)
        clock = sm_clock()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_steps(llm, batch())
            torch.cuda.synchronize()
        prof_steps = args.steps
        dtype = getattr(torch, args.dtype)
        gemms = gemms_alone_ms(cfg, per_step * args.isl, dtype)
        gemm_clock = sm_clock()
        llm.shutdown()

    flops = step_flops(cfg, per_step, args.isl)
    linear_flops = sum(2 * k * n for _, k, n in linear_shapes(cfg)) * cfg["num_hidden_layers"] * per_step * args.isl
    print(f"machine: {machine_name()} | {args.preset} {args.dtype} | attention {args.attn_backend}, compile "
          f"{args.compile_backend} | {per_step} prompts of {args.isl} tokens a step, {args.steps} steps ({steps} engine steps)")
    print(f"prefill step: {step_ms:.2f} ms of GPU time, {flops / 1e12:.1f} TFLOP -> {flops / step_ms / 1e9:.0f} "
          f"TFLOP/s | {clock}")
    total = sum(gemms.values())
    print(f"the step's linears alone (torch.mm, {per_step * args.isl} rows): {total:.2f} ms -> "
          f"{linear_flops / total / 1e9:.0f} TFLOP/s ("
          + ", ".join(f"{n} {ms:.2f}" for n, ms in gemms.items()) + f") | {gemm_clock}")
    kernels: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name].append(ev.device_time_total)
    busy_ms = sum(sum(v) for v in kernels.values()) / 1e3 / prof_steps
    print(f"kernels: {sum(len(v) for v in kernels.values()) / prof_steps:.0f} a step, busy {busy_ms:.2f} ms a step "
          f"({100 * busy_ms / step_ms:.0f}% of the step)")
    print(f"  {'kernel':100s} {'calls':>6s} {'ms/step':>8s} {'share':>6s}")
    table = sorted(((n, len(v) / prof_steps, sum(v) / 1e3 / prof_steps) for n, v in kernels.items()), key=lambda r: -r[2])
    for name, calls, ms in table[: args.top]:
        print(f"  {name[:100]:100s} {calls:6.1f} {ms:8.3f} {100 * ms / busy_ms:5.1f}%")


if __name__ == "__main__":
    main()
