"""Benchmark mode: random-token prompts, one warm-up, timed runs; latency and throughput figures."""

import random
import statistics
import time
from typing import Any


def random_prompts(vocab_size: int, isl: int, bs: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts that avoid the low ids where tokenizers keep special tokens."""
    rng = random.Random(seed)
    low = min(100, vocab_size // 4)
    return [[rng.randrange(low, vocab_size) for _ in range(isl)] for _ in range(bs)]


def run_benchmark(llm: Any, isl: int, osl: int, bs: int, num: int, progress: Any = None) -> dict[str, float]:
    """Time `num` runs (after one warm-up) of `bs` prompts of `isl` tokens generating `osl` tokens each."""
    from ad_runtime import SamplingParams

    vocab = llm.vocab_size
    prompts = random_prompts(vocab, isl, bs)
    sp = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, sp)  # warm-up: compilation, CUDA graphs, allocator
    latencies, ttfts = [], []
    for _ in range(num):
        start = time.perf_counter()
        outs = llm.generate(prompts, sp)
        latencies.append(time.perf_counter() - start)
        ttfts.append(max(o.metrics.first_token_time for o in outs) - start)
        if any(len(o.outputs[0].token_ids) != osl for o in outs):
            raise RuntimeError("benchmark run produced fewer tokens than requested")
        if progress is not None:
            progress()
    lat = statistics.mean(latencies)
    ttft = statistics.mean(ttfts)
    decode_time = max(lat - ttft, 1e-9)
    return {
        "num_runs": num,
        "batch_size": bs,
        "isl": isl,
        "osl": osl,
        "avg_latency_s": lat,
        "min_latency_s": min(latencies),
        "time_to_first_token_s": ttft,
        "time_per_output_token_s": decode_time / max(osl - 1, 1),
        "prefill_tokens_per_s": bs * isl / max(ttft, 1e-9),
        "decode_tokens_per_s": bs * max(osl - 1, 1) / decode_time,
        "total_tokens_per_s": bs * osl / lat,
    }
