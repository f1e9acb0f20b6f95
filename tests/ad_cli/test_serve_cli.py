"""`ad-serve`'s command line: help prints the server's and the configuration's options; bad options fail at once."""

import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("fastapi")


def _serve(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ad_cli.serve", *args], capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_server_then_configuration_options(flag: str) -> None:
    proc, _ = _serve(flag)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for option in ("--host", "--port", "--served-model-name", "--api-key", "--max-body-bytes", "--header-timeout",
                   "--body-timeout", "--max-connections", "--max-queued-requests"):
        assert option in out, option
    assert "127.0.0.1" in out  # the default bind host is said
    # Then the configuration options, as build_and_run_ad --help shows them.
    assert out.index("--max-queued-requests") < out.index("--args.world-size")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "99999"], "--port"),
        (["--port=-1"], "--port"),
        (["--port", "http"], "--port"),
        (["--max-body-bytes", "0"], "--max-body-bytes"),
        (["--header-timeout", "-1"], "--header-timeout"),
        (["--body-timeout", "nan"], "--body-timeout"),
        (["--max-connections", "many"], "--max-connections"),
        (["--max-queued-requests", "0"], "--max-queued-requests"),
    ],
)
def test_invalid_server_option_fails_at_once_with_one_line(args: list[str], needle: str) -> None:
    proc, took = _serve(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ad-serve: error:") and needle in lines[0], proc.stderr
    assert took < 20  # no model is built (that takes far longer); a Python start-up on a loaded machine


def test_taken_port_fails_before_the_model_is_built() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc, took = _serve("--port", str(port), "--args.device=cpu")
    assert proc.returncode == 2 and took < 30, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("ad-serve: error: cannot listen on 127.0.0.1:") and "Traceback" not in proc.stderr


def test_unresolvable_host_fails_at_once() -> None:
    proc, _ = _serve("--host", "no-such-host.invalid", "--port", "0")
    assert proc.returncode == 2 and "cannot resolve host" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("size", [1, 3])
def test_the_servers_batch_is_exactly_max_batch_size(size: int) -> None:
    # build_and_run_ad raises max_batch_size to prompt.batch_size (2 by default) to run its prompts together; a
    # server runs no prompts, so --args.max-batch-size=1 must mean one request at a time (it once meant 2).
    import yaml

    proc, _ = _serve(f"--args.max-batch-size={size}", "--args.device=cpu", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["args"]["max_batch_size"] == size


def test_engine_process_defaults_to_its_own_process_on_a_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from ad_cli.serve import serving_args
    from ad_config import load_llm_args
    from ad_runtime import build

    assert serving_args(load_llm_args(device="cpu")).engine_process is False
    assert serving_args(load_llm_args(device="cpu", engine_process=True)).engine_process is True
    assert serving_args(load_llm_args(device="cpu", world_size=2)).engine_process is None  # rank 0 is its own process
    monkeypatch.setattr(build, "resolve_device", lambda device, rank=0: torch.device("cuda", 0))
    assert serving_args(load_llm_args()).engine_process is True
    assert serving_args(load_llm_args(engine_process=False)).engine_process is False


@pytest.mark.parametrize("model", ["/no/such/folder", "missing.gguf"])
def test_missing_model_path_fails_before_the_build(model: str, tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ad_cli.serve", "--port", "0", f"--args.model={model}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"ad-serve: error: model path {model!r} does not exist"], proc.stderr
