"""ad-config installs alone (no torch) and resolves the spec's layered example in a fresh venv."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ad_config_helpers import MY_CONFIG, PRODUCTION

PACKAGE = Path(__file__).resolve().parents[2] / "packages" / "ad-config"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_install_only_ad_config_and_run(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_dir = venv / "bin"
    pip = subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(PACKAGE)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    if pip.returncode != 0 and ("Could not find" in pip.stderr or "connection" in pip.stderr.lower()):
        pytest.skip(f"package index unreachable: {pip.stderr.strip().splitlines()[-1]}")
    assert pip.returncode == 0, pip.stderr

    probe = subprocess.run([str(bin_dir / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr

    (tmp_path / "my_config.yaml").write_text(MY_CONFIG)
    (tmp_path / "production.yaml").write_text(PRODUCTION)
    proc = subprocess.run(
        [str(bin_dir / "ad-config"), "--yaml-extra", "my_config.yaml", "production.yaml", "--args.world-size=8"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = yaml.safe_load(proc.stdout)
    assert out["args"]["world_size"] == 8
    assert out["args"]["max_batch_size"] == 32
    assert out["args"]["transforms"]["compile_model"]["backend"] == "torch-opt"
    assert out["args"]["transforms"]["insert_cached_attention"]["backend"] == "triton"
