"""Offline throughput of LLM.generate for ISL/OSL grids, with each figure's cause printed beside it.

For every workload: output tokens/s, then per step kind (decode-only, mixed) the mean host time of each
phase (schedule, forward = inputs + launch, sample = launch + wait for the GPU, post-process), the GPU busy
time per step and the share of time the GPU sat idle between consecutive steps (CUDA events), and the
memory-bandwidth roofline of a decode step (weights + KV bytes over the measured device copy bandwidth).

    python benchmarks/gpu/throughput.py --preset llama3.1-8b --dtype bfloat16 \
        --workload 128/128/1024 --workload 1024/128/32 --workload 1000/1000/256
A workload is ISL/OSL/NUM: NUM prompts of ISL random tokens, OSL new tokens each (ignore_eos), given to
generate() together. --overlap on|off|both: overlapped scheduling on, off, or each workload without and then
with it on the same engine, with the number of requests whose greedy tokens are equal. Host phases: with
overlap, "post" holds the wait for the previous step's tokens; without, the wait for this step's.
"""

import argparse
import faulthandler
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from ad_runtime.executor import flashinfer_sampling

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_vs_ad import PRESETS, machine_name, memory_plan_check, model_source  # noqa: E402 - the benchmarks folder is no package


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write counted once each)."""
    if not torch.cuda.is_available():
        return float("nan")
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t)


def weight_bytes(llm) -> int:
    module = llm.engine.runner.module
    return sum(p.numel() * p.element_size() for p in module.parameters())


def kv_bytes_per_token(llm) -> int:
    cm = llm.engine.runner.cm
    return cm.bytes_per_page() // cm.page_size


def print_compile_phases(when: str) -> None:
    """Where torch.compile's time went so far (Dynamo tracing, AOTAutograd, Inductor, cache loads): seconds of each
    timed phase summed over the traces, largest first."""
    from torch._dynamo.utils import compile_times

    headers, values = compile_times(repr="csv", aggregate=True)
    phases = sorted(((float(v), h) for h, v in zip(headers, values) if _is_number(v)), reverse=True)
    print(f"torch.compile phases in {when} (s): " + ", ".join(f"{h} {v:.1f}" for v, h in phases[:10] if v >= 0.05))


def _is_number(v: object) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def make_llm(path: str, random_weights: bool, args: argparse.Namespace, max_seq_len: int, prefix_caching: bool = True):
    """The engine every GPU script builds: the same arguments key the same build cache entry (decode_profile.py
    and a second throughput.py run with the same --model-dir then load it instead of building)."""
    from ad_runtime import LLM

    extra = {}
    # Opt-in transforms (default.yaml has them off) and ones switched off for an A/B in the same call.
    switched = {name: True for name in getattr(args, "enable_transform", [])}
    switched.update({name: False for name in getattr(args, "disable_transform", [])})
    transforms: dict[str, dict] = {name: {"enabled": on} for name, on in switched.items()}
    for option in getattr(args, "transform_option", []):  # NAME.KEY=VALUE, VALUE read as YAML
        key, _, value = option.partition("=")
        name, _, field = key.partition(".")
        transforms.setdefault(name, {})[field] = yaml.safe_load(value)
    if transforms:
        extra["transforms"] = transforms
    if getattr(args, "stack_dump_after", 0):
        # A build that hangs or crawls shows where: every thread's stack on stderr each time this many seconds pass.
        faulthandler.dump_traceback_later(args.stack_dump_after, repeat=True)
    llm = LLM(model=path, skip_loading_weights=random_weights, skip_tokenizer_init=random_weights,
              dtype=args.dtype, max_batch_size=args.max_batch_size, max_seq_len=max_seq_len,
              max_num_tokens=args.max_num_tokens, enable_chunked_prefill=True,
              compile_backend=args.compile_backend, attn_backend=args.attn_backend,
              enable_prefix_caching=prefix_caching, **extra)
    faulthandler.cancel_dump_traceback_later()
    return llm


def compile_counts() -> str:
    """Graphs compiled (Inductor straight on the graph, or Dynamo's traces) and what the disk caches did."""
    from torch._dynamo.utils import counters

    aot = dict(counters["aot_autograd"])
    cache = {k: v for k, v in counters["inductor"].items() if "cache" in k}
    return (f"{aot.get('total', 0)} Inductor compiles (AOTAutograd {aot}), {counters['stats']['unique_graphs']} "
            f"Dynamo traces; inductor caches {cache}")


def add_build_options(p: argparse.ArgumentParser) -> None:
    """Options of make_llm shared by the GPU scripts."""
    p.add_argument("--enable-transform", action="append", default=[], metavar="NAME",
                   help="switch on a transform that default.yaml leaves off (e.g. visualize_namespace); repeatable")
    p.add_argument("--transform-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="set one option of a transform (resize_kv_cache.free_mem_ratio=0.5); repeatable")
    p.add_argument("--disable-transform", action="append", default=[], metavar="NAME",
                   help="switch off a transform that default.yaml runs (an A/B: fuse_rope_into_attention); repeatable")
    p.add_argument("--stack-dump-after", type=float, default=0, metavar="S",
                   help="print every thread's stack each S seconds while the engine builds (find a stuck build)")


def model_path(args: argparse.Namespace, tmp: str) -> tuple[str, bool]:
    """(model folder, random weights?): --model-dir keeps the random model's config.json for later runs."""
    folder = Path(args.model_dir) if args.model_dir else Path(tmp)
    if (folder / "config.json").exists():  # written by an earlier run: rewriting it would change the cache key
        return str(folder), True
    return model_source(argparse.Namespace(preset=args.preset), folder)


def run_workload(llm, prompts: list[list[int]], osl: int, overlap: bool, sampling: dict | None = None) -> dict:
    from ad_runtime import SamplingParams
    from ad_runtime.executor.step_timer import StepTimer

    isl, num = len(prompts[0]), len(prompts)
    llm.engine.set_overlap(overlap)
    # Warm up on other prompts of the same length: warming up on these would leave their prefixes in the prefix
    # cache, and the timed run would skip its prefill.
    rng = random.Random(len(prompts) * 7919 + isl)
    warm = [[rng.randrange(100, max(prompts[0]) + 1) for _ in range(isl)] for _ in range(min(num, 64))]
    # Greedy unless --temperature: a served batch usually samples (temperature, top-p), which the sampler runs
    # outside the captured graph. The warm-up samples the same way.
    sampling = sampling or {"temperature": 0.0}
    llm.generate(warm, SamplingParams(max_tokens=min(osl, 8), ignore_eos=True, **sampling))
    sp = SamplingParams(max_tokens=osl, ignore_eos=True, **sampling)
    timer = StepTimer(llm.engine.runner.device)
    llm.engine.timer = timer
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    hits_before = llm.engine.prefix_cache_stats.hit_tokens
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    dt = time.perf_counter() - t
    llm.engine.timer = None
    assert all(len(o.outputs[0].token_ids) == osl for o in outs), "every request must produce OSL tokens"
    hits = llm.engine.prefix_cache_stats.hit_tokens - hits_before
    assert hits == 0, f"{hits} prompt tokens came from the prefix cache: the figure would not include their prefill"
    return {"isl": isl, "osl": osl, "num": num, "overlap": overlap, "seconds": dt, "out_tok_s": num * osl / dt,
            "steps": timer.summary(), "mixed_steps": timer.gpu_ms_of("mixed"),
            "tokens": [o.outputs[0].token_ids for o in outs]}


def print_row(r: dict, bw: float, wbytes: int, kv_tok: int) -> None:
    print(f"\nISL {r['isl']} / OSL {r['osl']} x {r['num']}, overlap {'on' if r['overlap'] else 'off'}: "
          f"{r['out_tok_s']:,.0f} output tok/s ({r['seconds']:.2f} s)")
    for kind, s in r["steps"].items():
        phases = " ".join(f"{p} {s[f'{p}_ms']:.2f}" for p in ("schedule", "forward", "sample", "post"))
        line = f"  {kind:6s} steps {int(s['steps']):5d} rows {s['rows']:6.1f} | host ms: {phases} (sum {s['host_ms']:.2f})"
        if "gpu_ms" in s:
            line += f" | GPU {s['gpu_ms']:.2f} ms/step, idle between steps {100 * s['gpu_idle_share']:.1f}%"
        if kind == "decode" and bw == bw:
            ctx = r["isl"] + r["osl"] / 2
            roof = (wbytes + s["rows"] * ctx * kv_tok) / bw * 1e3
            line += f" | roofline {roof:.2f} ms/step (weights + KV at {bw / 1e12:.2f} TB/s)"
        print(line)
    if r.get("mixed_steps"):
        print("  mixed steps one by one (rows, GPU ms): "
              + ", ".join(f"{rows} {ms:.1f}" for rows, ms in r["mixed_steps"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3.1-8b")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--workload", action="append", default=None, help="ISL/OSL/NUM (repeatable)")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--max-seq-len", type=int, default=2048, help="raised to what the longest workload needs")
    p.add_argument("--compile-backend", default="auto")
    p.add_argument("--attn-backend", default="auto")
    p.add_argument("--overlap", choices=["on", "off", "both"], default="on",
                   help="overlapped scheduling; both: run each workload without, then with, and compare tokens")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); above: every row samples")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    add_build_options(p)
    p.add_argument("--model-dir", default=None,
                   help="keep the random-weight model's config here (default: a temporary folder); the same folder "
                        "in a second run keys the same build cache entry, so that run measures a warm build")
    args = p.parse_args()
    workloads = [tuple(int(x) for x in w.split("/")) for w in (args.workload or ["128/128/1024", "1024/128/32"])]

    bw = copy_bandwidth()
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, random_weights = model_path(args, tmp)
        # A fixed max_seq_len unless a workload needs more: runs with other workloads then share a build cache entry.
        max_len = max([args.max_seq_len] + [i + o + 8 for i, o, _ in workloads])
        t = time.perf_counter()
        # --overlap both runs the same prompts twice: the second run would find them all cached
        llm = make_llm(path, random_weights, args, max_len, prefix_caching=args.overlap != "both")
        print(f"build: {time.perf_counter() - t:.1f} s to a ready engine; "
              + "; ".join(f"{r.summary()} | {r.timings(top=8)}" for r in llm.build_reports))
        print(f"compiles during the build: {compile_counts()}")
        if args.temperature > 0:
            # Top-p batches sort with torch until FlashInfer's kernels have loaded (a compile on a fresh machine):
            # wait, so that every timed batch takes the path a long-running engine takes.
            print("waiting for FlashInfer's sampling kernels (a JIT compile of ~80-100 s on a machine's first use; "
                  "AUTODEPLOY_FLASHINFER_SAMPLING=0 sorts with torch instead)")
            t = time.perf_counter()
            ready = flashinfer_sampling.wait_ready(timeout=900)
            print(f"FlashInfer sampling kernels {'ready' if ready else 'not used'} "
                  f"({time.perf_counter() - t:.1f} s waited after the build)")
        print(memory_plan_check(llm))
        print_compile_phases("the build")
        wbytes, kv_tok = weight_bytes(llm), kv_bytes_per_token(llm)
        print(f"machine: {machine_name()} | model: {args.preset} ({wbytes / 1e9:.2f} GB of weights) | {args.dtype}"
              f" | copy bandwidth {bw / 1e12:.2f} TB/s | batch-1 decode roofline {wbytes / bw * 1e3:.2f} ms")
        modes = {"on": [True], "off": [False], "both": [False, True]}[args.overlap]
        for isl, osl, num in workloads:
            prompts = [[rng.randrange(100, llm.vocab_size) for _ in range(isl)] for _ in range(num)]
            sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
            results = [run_workload(llm, prompts, osl, overlap, sampling) for overlap in modes]
            for r in results:
                print_row(r, bw, wbytes, kv_tok)
                rows.append({k: v for k, v in r.items() if k != "tokens"})
            if len(results) == 2 and args.temperature == 0.0:
                same = sum(a == b for a, b in zip(results[0]["tokens"], results[1]["tokens"]))
                print(f"  greedy tokens equal with and without overlap: {same} of {num} requests")
        print(f"\ncompiles in all (build and workloads): {compile_counts()}")
        print_compile_phases("all")
        llm.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=machine_name(), preset=args.preset, rows=rows), indent=2))


if __name__ == "__main__":
    main()
