"""Where a CPU decode step goes: op table of our engine's steps and of HF's, beside the memory-bandwidth roofline.

    python benchmarks/cpu_decode_profile.py --batch-sizes 1 8 --isl 40 --steps 24

The bundled SmolLM2-135M-Instruct (real weights, float32). For each batch size: B prompts of ISL tokens are
prefilled, then STEPS decode steps are timed (wall clock) and profiled (torch.profiler, CPU ops): printed are the
step time, the roofline (weight bytes read once per step over the measured read bandwidth) and its share, and the
top ops by self CPU time per step. HF `generate` on the same prompts is timed the same way (its decode step from
two runs with different numbers of new tokens), so both sides' step times are from one run.
"""

import argparse
import random
import time

import torch
from torch.profiler import ProfilerActivity, profile


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s of reading a buffer much larger than the caches (a sum: one read, no write stream)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decode step: every parameter once (a tied embedding is read once, as the LM head)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def ours(llm, prompts: list[list[int]], steps: int, top: int) -> tuple[float, list]:
    from ad_runtime import SamplingParams

    eng = llm.engine
    sp = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    reqs = [eng.add_request(p, sp) for p in prompts]
    while any(not r.output_token_ids for r in reqs):
        eng.step()
    for _ in range(3):
        eng.step()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    step_s = (time.perf_counter() - t) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            eng.step()
    for r in reqs:
        eng.abort(r, "profiling done")
    return step_s, _table(prof, steps, top)


def hf(model, prompts: list[list[int]], steps: int, top: int) -> tuple[float, list]:
    ids = torch.tensor(prompts)
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)

    def run(n: int) -> float:
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t

    with torch.inference_mode():
        run(4)
        short, long = min(run(4) for _ in range(2)), min(run(4 + steps) for _ in range(2))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, **kw)
    return (long - short) / steps, _table(prof, steps, top)


def _table(prof, steps: int, top: int) -> list[tuple[str, float, float]]:
    rows = [(e.key, e.count / steps, e.self_cpu_time_total / steps) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[2])[:top]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--isl", type=int, default=40)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--compile-backend", default="auto")
    args = p.parse_args()
    from ad_compiler.models.bundled import bundled_model_dir
    from ad_runtime import LLM
    from transformers import AutoModelForCausalLM

    path = str(bundled_model_dir())
    bw = read_bandwidth()
    rng = random.Random(0)
    llm = LLM(model=path, dtype="float32", max_batch_size=max(args.batch_sizes), max_seq_len=args.isl + 2 * args.steps + 16,
              compile_backend=args.compile_backend)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    wbytes = weight_bytes(model)
    roof = wbytes / bw
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; read bandwidth {bw / 1e9:.1f} GB/s; "
          f"weights {wbytes / 1e6:.0f} MB -> roofline {roof * 1e3:.1f} ms/step")
    for bs in args.batch_sizes:
        prompts = [[rng.randrange(100, llm.vocab_size) for _ in range(args.isl)] for _ in range(bs)]
        for name, (step, table) in (("ours", ours(llm, prompts, args.steps, args.top)),
                                    ("HF", hf(model, prompts, args.steps, args.top))):
            print(f"\n[{name}] batch {bs}: decode step {step * 1e3:.1f} ms ({bs / step:.1f} tok/s), "
                  f"roofline share {roof / step:.0%}")
            print(f"  {'op':<44} {'calls/step':>10} {'self ms/step':>12}")
            for op, calls, us in table:
                print(f"  {op[:44]:<44} {calls:>10.1f} {us / 1e3:>12.2f}")


if __name__ == "__main__":
    main()
