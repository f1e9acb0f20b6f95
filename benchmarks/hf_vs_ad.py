"""Same prompts through Hugging Face `generate` and through our LLM, in one run: tokens/s and their ratio.

CPU (bundled SmolLM2, real weights):
    python benchmarks/hf_vs_ad.py --batch-sizes 1 8 --isl 128 --osl 32
GPU (random-weight Llama-3.1-8B config, bf16):
    python benchmarks/hf_vs_ad.py --preset llama3.1-8b --dtype bfloat16 --batch-sizes 1 32 --isl 1024 --osl 128
"""

import argparse
import gc
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

PRESETS = {
    # Shapes of meta-llama/Llama-3.1-8B; weights are random (the hub is not reachable here).
    "llama3.1-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False,
    ),
    # Shapes of HuggingFaceTB/SmolLM2-135M (the bundled model's architecture) with random weights.
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
    ),
    "llama-tiny": dict(
        vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
    ),
}


def machine_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def model_source(args: argparse.Namespace, tmp: Path) -> tuple[str | None, bool]:
    """(model path for both sides, whether weights are random)."""
    if args.preset is None:
        from ad_compiler.models.bundled import bundled_model_dir

        return str(bundled_model_dir()), False
    from transformers import LlamaConfig

    cfg = LlamaConfig(**PRESETS[args.preset])
    cfg.save_pretrained(tmp)
    return str(tmp), True


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_hf(path: str, random_weights: bool, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if random_weights:
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model.eval()


def time_hf(model, prompts: list[list[int]], osl: int, runs: int) -> float:
    """Tokens/s of HF generate over `runs` timed runs after one warm-up."""
    ids = torch.tensor(prompts, device=model.device)
    kw = dict(max_new_tokens=osl, min_new_tokens=osl, do_sample=False, attention_mask=torch.ones_like(ids),
              pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, **kw)  # warm-up
        sync()
        t = time.perf_counter()
        for _ in range(runs):
            out = model.generate(ids, **kw)
        sync()
        dt = (time.perf_counter() - t) / runs
    assert out.shape[1] == ids.shape[1] + osl
    return len(prompts) * osl / dt


def bench_hf(path: str, random_weights: bool, dtype: torch.dtype, prompts: list[list[int]], osl: int, runs: int) -> float:
    model = load_hf(path, random_weights, dtype)
    tps = time_hf(model, prompts, osl, runs)
    del model
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return tps


def bench_ad(llm, prompts: list[list[int]], osl: int, runs: int) -> float:
    from ad_runtime import SamplingParams

    sp = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, sp)  # warm-up
    sync()
    t = time.perf_counter()
    for _ in range(runs):
        outs = llm.generate(prompts, sp)
    sync()
    dt = (time.perf_counter() - t) / runs
    assert all(len(o.outputs[0].token_ids) == osl for o in outs)
    return len(prompts) * osl / dt


def memory_plan_check(llm) -> str:
    """Rank 0's memory plan (made before any weight was read) against what its build then allocated."""
    from ad_runtime.memory_plan import weight_bytes

    plan = llm.build_reports[0].memory
    if plan is None:
        return "memory plan: none was made"
    runner = llm.engine.runner
    weights = weight_bytes(runner.module)
    kv = sum(t.numel() * t.element_size() for name, t in runner.cm.caches.items() if name in runner.cm.cache_specs)
    return (f"memory plan against the build: weights {plan.weight_bytes / 2**30:.3f} GiB planned, "
            f"{weights / 2**30:.3f} GiB allocated ({weights / plan.weight_bytes:.3f}x); KV cache "
            f"{plan.kv_bytes / 2**30:.3f} GiB planned, {kv / 2**30:.3f} GiB allocated ({kv / max(plan.kv_bytes, 1):.3f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="random-weight config (default: bundled SmolLM2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--isl", type=int, default=128)
    p.add_argument("--osl", type=int, default=32)
    p.add_argument("--runs", type=int, default=2, help="timed runs after a warm-up; on a CPU: alternating pairs "
                   "(ours, HF), the best of each side kept")
    p.add_argument("--compile-backend", default="auto")
    p.add_argument("--attn-backend", default="auto")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, random_weights = model_source(args, Path(tmp))
        from ad_runtime import LLM

        max_bs = max(args.batch_sizes)
        t = time.perf_counter()
        llm = LLM(
            model=path, skip_loading_weights=random_weights, skip_tokenizer_init=random_weights, dtype=args.dtype,
            max_batch_size=max_bs, max_seq_len=args.isl + args.osl + 8, max_num_tokens=max(args.isl * max_bs, 2048),
            compile_backend=args.compile_backend, attn_backend=args.attn_backend,
        )
        built = time.perf_counter() - t
        from ad_runtime import SamplingParams

        t = time.perf_counter()  # a first short request: what a compiling backend compiles on first use
        llm.generate([[100] * 8], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        print(f"build: {built:.1f} s to a ready engine, then {time.perf_counter() - t:.1f} s for a first short request "
              f"({args.compile_backend})", flush=True)
        print(memory_plan_check(llm), flush=True)
        vocab = llm.vocab_size
        workloads = [(bs, [[rng.randrange(100, vocab) for _ in range(args.isl)] for _ in range(bs)])
                     for bs in args.batch_sizes]
        if torch.cuda.is_available():
            # One model at a time on the GPU (ours takes most free memory for its KV cache): ours first, then HF.
            ours = [bench_ad(llm, prompts, args.osl, args.runs) for _, prompts in workloads]
            llm.shutdown()
            del llm
            gc.collect()
            torch.cuda.empty_cache()
            theirs = [bench_hf(path, random_weights, dtype, prompts, args.osl, args.runs) for _, prompts in workloads]
        else:
            # On a CPU both fit side by side: single runs alternate and each side keeps its best, so that a shared
            # machine's drifting memory bandwidth (1.5x between minutes on the development VM) hits both alike.
            hf = load_hf(path, random_weights, dtype)
            ours, theirs = [], []
            for _, prompts in workloads:
                pairs = [(bench_ad(llm, prompts, args.osl, 1), time_hf(hf, prompts, args.osl, 1))
                         for _ in range(args.runs)]
                ours.append(max(p[0] for p in pairs))
                theirs.append(max(p[1] for p in pairs))
            llm.shutdown()
        for (bs, _), ad_tps, hf_tps in zip(workloads, ours, theirs):
            rows.append(dict(batch=bs, isl=args.isl, osl=args.osl, hf_tok_s=hf_tps, ad_tok_s=ad_tps, ratio=ad_tps / hf_tps))
    machine = machine_name()
    model = args.preset or "SmolLM2-135M-Instruct (bundled)"
    print(f"\nmachine: {machine} | model: {model} | dtype: {args.dtype}")
    print(f"{'batch':>5} {'isl':>5} {'osl':>5} {'HF tok/s':>10} {'ours tok/s':>11} {'ratio':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['isl']:>5} {r['osl']:>5} {r['hf_tok_s']:>10.1f} {r['ad_tok_s']:>11.1f} {r['ratio']:>6.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(machine=machine, model=model, dtype=args.dtype, rows=rows), indent=2))


if __name__ == "__main__":
    main()
