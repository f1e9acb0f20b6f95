"""build_and_run_ad --dry-run prints what ad-config prints, exits 0 and never imports torch."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

# device cuda: a GPU-only compile backend with device auto is refused on a machine without a GPU.
ARGV = ["--model", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "--args.world-size=2", "--args.compile-backend=torch-opt",
        "--args.device=cuda"]


def _run(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AD_")}
    return subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_same_as_ad_config(tmp_path: Path) -> None:
    dry = _run("-m", "ad_cli.build_and_run_ad", *ARGV, "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    plain = _run("-m", "ad_config", *ARGV, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert dry.stdout == plain.stdout
    out = yaml.safe_load(dry.stdout)
    assert out["args"]["world_size"] == 2 and out["args"]["compile_backend"] == "torch-opt"
    assert "dry_run" not in out  # printed config runs for real when fed back


def test_dry_run_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from ad_cli.build_and_run_ad import main\n"
        "try:\n"
        "    main(['--dry-run', '--args.world-size=2'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = _run("-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "world_size: 2" in proc.stdout


def test_config_error_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = _run("-m", "ad_cli.build_and_run_ad", "--args.world-size=zero", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "args.world_size" in proc.stderr
