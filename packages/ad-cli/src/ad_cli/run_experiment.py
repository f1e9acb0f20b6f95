"""The main job of build_and_run_ad: build the LLM, answer the prompts, optionally benchmark, store results."""

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .benchmark import run_benchmark
from .prompts import Prompt, as_chat, display, normalize_queries

logger = logging.getLogger("ad_cli")


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal only, so piped and captured output stays clean.
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=None)


def quiet_libraries() -> None:
    """Silence the libraries below us (tokenizer hints, deprecation notes) unless the log level is debug.

    Their warnings are about their internals, not about anything a user of build_and_run_ad can change.
    Their progress bars (GGUF conversion, checkpoint loading) show on a terminal only, like ours.
    """
    if not sys.stderr.isatty():
        _no_library_progress_bars()
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    level = logging.ERROR
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # transformers comes with ad-compiler; stay quiet anyway without it
        pass
    for name in ("torch", "torch._dynamo", "torch._inductor", "torch.distributed", "huggingface_hub"):
        logging.getLogger(name).setLevel(level)


def _no_library_progress_bars() -> None:
    # The environment variables reach spawned rank processes too; the calls cover modules already imported.
    # TQDM_DISABLE is tqdm's default for bars that do not choose (transformers' GGUF conversion); ours pass
    # disable=None (terminal only) explicitly.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _prompts_and_params(config: Any) -> tuple[list[Prompt], Any]:
    """The batch of queries and its SamplingParams; a bad entry is a ConfigError naming the key."""
    from ad_config import ConfigError
    from ad_runtime import SamplingParams

    try:
        queries = normalize_queries(config.prompt.queries, config.prompt.batch_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        sp = SamplingParams.from_kwargs(dict(config.prompt.sp_kwargs))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"prompt.sp_kwargs: {e}") from None
    return queries, sp


def _print_benchmark(stats: dict[str, Any]) -> None:
    print("benchmark:", flush=True)
    for k, v in stats.items():
        print(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}", flush=True)


def build_line(seconds: float, reports: list[Any]) -> str:
    """`build: 4.2 s (build cache hit)`: the time until the model could answer, and what the build cache did
    (per rank where the ranks differ)."""
    states = [r.cache for r in reports]
    cache = states[0] if len(set(states)) == 1 else ", ".join(f"rank {i}: {s}" for i, s in enumerate(states))
    return f"build: {seconds:.1f} s (build cache {cache})"


def run_experiment(config: Any) -> dict[str, Any]:
    """Run an ExperimentConfig; prints each prompt with its answer; returns what it stored."""
    quiet_libraries()
    from ad_runtime import LLM

    queries, sp = _prompts_and_params(config)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    with LLM.from_args(config.args) as llm:
        print(build_line(time.perf_counter() - start, llm.build_reports), flush=True)
        if llm.build_reports[0].memory is not None:
            print(f"memory plan (rank 0): {llm.build_reports[0].memory.summary()}", flush=True)
        has_template = bool(getattr(llm.tokenizer, "chat_template", None))
        outs = llm.generate([as_chat(q, has_template) for q in queries], sp)
        pairs = []
        for i, (q, o) in enumerate(zip(queries, outs)):
            answer = f"error: {o.error}" if o.error else f"output: {o.outputs[0].text}"
            print(f"[{i}] prompt: {display(q)}\n    {answer}", flush=True)
            pairs.append([display(q), o.outputs[0].text])
        results["prompts_and_outputs"] = pairs
        if config.benchmark.enabled:
            b = config.benchmark
            bar = _progress_bar(b.num, "benchmark")
            try:
                stats = run_benchmark(llm, b.isl, b.osl, b.bs, b.num, progress=lambda: bar.update(1))
            finally:
                bar.close()
            results["benchmark_results"] = stats
            _print_benchmark(stats)
    if config.benchmark.store_results:
        results.setdefault("benchmark_results", {})
        results["config"] = config.model_dump(mode="json")
        path = Path(config.benchmark.results_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"results written to {path}", flush=True)
    return results
