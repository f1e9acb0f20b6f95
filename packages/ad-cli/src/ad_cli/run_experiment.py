"""The main job of build_and_run_ad: build the LLM, answer the prompts, optionally benchmark, store results."""

import json
import logging
import sys
from pathlib import Path
from typing import Any

from .benchmark import run_benchmark
from .prompts import as_chat, display, normalize_queries

logger = logging.getLogger("ad_cli")


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=not sys.stderr.isatty())


def run_experiment(config: Any) -> dict[str, Any]:
    """Run an ExperimentConfig; prints each prompt with its answer; returns what it stored."""
    from ad_runtime import LLM, SamplingParams

    queries = normalize_queries(config.prompt.queries, config.prompt.batch_size)
    sp = SamplingParams.from_kwargs(dict(config.prompt.sp_kwargs))
    results: dict[str, Any] = {}
    with LLM.from_args(config.args) as llm:
        has_template = bool(getattr(llm.tokenizer, "chat_template", None))
        prompts = [as_chat(q, has_template) for q in queries]
        outs = llm.generate(prompts, sp)
        pairs = []
        for i, (q, o) in enumerate(zip(queries, outs)):
            if o.error:
                print(f"[{i}] prompt: {display(q)}\n    error: {o.error}", flush=True)
            else:
                print(f"[{i}] prompt: {display(q)}\n    output: {o.outputs[0].text}", flush=True)
            pairs.append([display(q), o.outputs[0].text])
        results["prompts_and_outputs"] = pairs
        if config.benchmark.enabled:
            b = config.benchmark
            bar = _progress_bar(b.num, "benchmark")
            stats = run_benchmark(llm, b.isl, b.osl, b.bs, b.num, progress=lambda: bar.update(1))
            bar.close()
            results["benchmark_results"] = stats
            print("benchmark:", flush=True)
            for k, v in stats.items():
                print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}", flush=True)
        if config.benchmark.store_results:
            results.setdefault("benchmark_results", {})
            results["config"] = config.model_dump(mode="json")
            path = Path(config.benchmark.results_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
            print(f"results written to {path}", flush=True)
    return results
