"""ad-export: writes model.pt2 (loads in a fresh process, same logits), graph.txt and report.json; errors exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ad_compiler.__main__ import main

PROBE = """
import sys, torch, ad_compiler
m = torch.export.load(sys.argv[1]).module()
ids = torch.arange(12).reshape(3, 4) % 200
pos = torch.arange(4).expand(3, 4)
torch.save(m(input_ids=ids, position_ids=pos), sys.argv[2])
"""


@pytest.fixture(scope="module")
def exported_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ad_export")
    rc = main(["--args.model", str(tiny_llama_dir), "--args.device=cpu", "--args.dtype=float32", "--out", str(out)])
    assert rc == 0
    return out


def test_writes_outputs_and_report(exported_dir: Path, capsys):
    report = json.loads((exported_dir / "report.json").read_text())
    names = [r["transform"] for r in report["transforms"]]
    assert names[:2] == ["build_model", "export_to_gm"]
    assert "load_weights" in names and "visualize_namespace" not in names  # stops at post_load_fusion
    for row in report["transforms"]:
        assert set(row) == {"transform", "stage", "status", "matches", "seconds", "reason"}
        assert row["status"] in {"applied", "skipped", "failed"}
    assert "torch.ops.auto_deploy.torch_attention" in (exported_dir / "graph.txt").read_text()


def test_model_pt2_loads_in_fresh_process(exported_dir: Path, tiny_llama_hf, tmp_path: Path):
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", PROBE, str(exported_dir / "model.pt2"), str(out)], check=True, timeout=300)
    ids = torch.arange(12).reshape(3, 4) % 200
    pos = torch.arange(4).expand(3, 4)
    with torch.no_grad():
        ref = tiny_llama_hf(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(torch.load(out), ref, atol=1e-5, rtol=1e-5)


def test_bad_stage_is_one_line_exit_2(tmp_path: Path, capsys):
    assert main(["--out", str(tmp_path), "--until", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ad-export: error: --until 'nowhere'") and "\n" not in err


def test_missing_model_is_one_line_exit_2(tmp_path: Path, capsys):
    assert main(["--args.model", str(tmp_path / "nope.gguf"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "\n" not in err
