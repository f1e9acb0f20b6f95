"""build_and_run_ad end to end on the CPU: prompts, benchmark mode, the results JSON, the default run, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The bundled model is real; two layers of it keep a run fast where the answers need not make sense.
TWO_LAYERS = ["--args.model-kwargs.num-hidden-layers=2"]
CPU = ["--args.device=cpu"]


def _run(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # AD_ variables of the calling shell would change the configuration under test.
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AD_")}
    if "AD_CACHE_DIR" in os.environ:  # but the converted bundled model may be cached there
        env["AD_CACHE_DIR"] = os.environ["AD_CACHE_DIR"]
    cmd = [sys.executable, "-m", "ad_cli.build_and_run_ad", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_prompts_and_benchmark_write_the_results_json(tmp_path: Path) -> None:
    results = tmp_path / "out" / "results.json"
    proc = _run(
        *CPU, *TWO_LAYERS, "--args.max-seq-len=128",
        "--prompt.batch-size=2",
        "--prompt.queries", "Hello there.", "Count to three.",
        "--prompt.sp-kwargs.max-tokens=5", "--prompt.sp-kwargs.temperature=0",
        "--benchmark.enabled=true", "--benchmark.isl=8", "--benchmark.osl=4",
        "--benchmark.bs=2", "--benchmark.num=2",
        "--benchmark.store-results=true", f"--benchmark.results-path={results}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(results.read_text())

    pairs = data["prompts_and_outputs"]
    assert [p[0] for p in pairs] == ["Hello there.", "Count to three."]
    assert all(isinstance(p[1], str) and p[1] for p in pairs)

    bench = data["benchmark_results"]
    assert (bench["batch_size"], bench["isl"], bench["osl"], bench["num_runs"]) == (2, 8, 4, 2)
    for key in ("avg_latency_s", "time_to_first_token_s", "time_per_output_token_s",
                "prefill_tokens_per_s", "decode_tokens_per_s", "total_tokens_per_s"):
        assert bench[key] > 0, key
    assert bench["time_to_first_token_s"] < bench["avg_latency_s"]

    config = data["config"]
    assert config["args"]["model_kwargs"] == {"num_hidden_layers": 2}
    assert config["benchmark"]["isl"] == 8 and config["prompt"]["batch_size"] == 2
    assert config["args"]["max_seq_len"] >= 12  # raised to isl + osl at least

    # Every prompt is printed with its output on stdout; logs stay off it.
    assert proc.stdout.count("prompt:") == 2 and "benchmark:" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_default_run_answers_the_capital_question(tmp_path: Path) -> None:
    # The default configuration, but 12 new tokens instead of 100: sampling is seeded (args.seed) and
    # draws once per step in the same order, so the first 12 tokens are those of the full default run.
    proc = _run("--prompt.sp-kwargs.max-tokens=12", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "What is the capital of France?" in proc.stdout
    answer = proc.stdout.split("What is the capital of France?", 1)[1].split("prompt:", 1)[0]
    assert "Paris" in answer, proc.stdout
    # Quiet by default: no log records of our own packages on stderr.
    assert " ad_" not in proc.stderr and "INFO" not in proc.stderr, proc.stderr


@pytest.mark.slow
def test_first_run_on_a_pipe_leaves_stderr_empty(tmp_path: Path) -> None:
    """A fresh cache converts the GGUF file: no library progress bars, chatter or warnings on a non-terminal."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("AD_", "TQDM_", "HF_HUB_DISABLE"))}
    env["AD_CACHE_DIR"] = str(tmp_path / "cache")
    cmd = [sys.executable, "-m", "ad_cli.build_and_run_ad", "--args.model-kwargs.num-hidden-layers=2",
           "--prompt.sp-kwargs.max-tokens=2", "--prompt.queries", "Hi"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # the 2-layer cut drops checkpoint tensors: an info line, not a warning
    assert "[0] prompt: Hi" in proc.stdout
    assert "(build cache miss)" in proc.stdout and list((tmp_path / "cache" / "builds").glob("*.adbuild"))


def test_missing_model_path_is_one_line_and_exit_1(tmp_path: Path) -> None:
    proc = _run(*CPU, "--model", str(tmp_path / "no-such-model"), cwd=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("build_and_run_ad: error: ") and "no-such-model" in lines[0]
    assert "does not exist" in lines[0]


def test_missing_model_path_with_debug_log_keeps_the_traceback(tmp_path: Path) -> None:
    proc = _run(*CPU, "--model", str(tmp_path / "no-such-model"), "--log-level=debug", cwd=tmp_path, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().splitlines()[-1].startswith("build_and_run_ad: error:")


def test_unknown_sampling_key_is_a_config_error(tmp_path: Path) -> None:
    # The free-form sp_kwargs mapping accepts any key; SamplingParams rejects it before the model is built.
    proc = _run(*CPU, *TWO_LAYERS, "--prompt.sp-kwargs.temprature=0.5", cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) <= 2 and "temprature" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
