"""ad-config / python -m ad_config: YAML on stdout that reproduces itself, --show-origin, no torch."""

import subprocess
import sys
from pathlib import Path

import yaml
from ad_config import render_yaml
from ad_config_helpers import MY_CONFIG, PRODUCTION, resolve, run_module

ARGV = [
    "--model", "meta-llama/Meta-Llama-3.1-8B-Instruct",
    "--yaml-extra", "my_config.yaml", "production.yaml",
    "--args.world-size=8",
    "--args.transforms.export-to-gm.strict=true",
    "--args.transforms.detect-sharding.manual-config.tp-plan.q-proj=colwise",
    "--prompt.sp-kwargs.temperature=0.7",
    "--benchmark.enabled=true",
]  # fmt: skip


def _write_spec_files(folder: Path) -> None:
    (folder / "my_config.yaml").write_text(MY_CONFIG)
    (folder / "production.yaml").write_text(PRODUCTION)


def test_printed_yaml_fed_back_reproduces_config(tmp_path: Path) -> None:
    _write_spec_files(tmp_path)
    first = run_module("ad_config", *ARGV, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    printed = yaml.safe_load(first.stdout)
    assert printed["args"]["world_size"] == 8
    assert printed["args"]["transforms"]["export_to_gm"]["strict"] is True
    assert printed["args"]["max_seq_len"] == 2048 + 128
    (tmp_path / "resolved.yaml").write_text(first.stdout)
    second = run_module("ad_config", "--yaml-extra", "resolved.yaml", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def test_roundtrip_in_process(spec_files: Path) -> None:
    cfg = resolve(*ARGV)
    (spec_files / "again.yaml").write_text(render_yaml(cfg))
    again = resolve("--yaml-extra", "again.yaml")
    drop = {"yaml_extra"}
    assert again.model_dump(exclude=drop) == cfg.model_dump(exclude=drop)


def _default_yaml_line(transform: str, key: str) -> int:
    """The line of `key` under `transform` in the built-in default.yaml (1-based)."""
    import ad_config

    lines = (Path(ad_config.__file__).parent / "default.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{transform}:"))
    return next(i for i in range(start + 1, len(lines)) if lines[i].strip().startswith(f"{key}:")) + 1


def test_show_origin(tmp_path: Path) -> None:
    _write_spec_files(tmp_path)
    proc = run_module("ad_config", *ARGV, "--show-origin", cwd=tmp_path, env={"AD_ARGS__ATTN_PAGE_SIZE": "32"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()

    def origin(key: str) -> str:
        hits = [line for line in lines if line.startswith(f"{key} = ")]
        assert len(hits) == 1, (key, proc.stdout)
        return hits[0]

    assert origin("args.world_size").endswith("[command line --args.world-size]")
    assert origin("args.max_batch_size") == "args.max_batch_size = 32  [production.yaml:4]"
    assert origin("args.max_seq_len").endswith("[raised to benchmark.isl + benchmark.osl]")
    assert origin("args.attn_page_size").endswith("[environment AD_ARGS__ATTN_PAGE_SIZE]")
    assert origin("args.model_kwargs.hidden_size").endswith("[my_config.yaml:5]")
    norm_line = _default_yaml_line("fuse_rmsnorm", "backend")
    assert origin("args.transforms.fuse_rmsnorm.backend").endswith(f"[default.yaml:{norm_line}]")
    assert 'args.transforms.compile_model.backend = "torch-opt"  [production.yaml:7]' in lines
    assert origin("prompt.sp_kwargs.top_k").endswith("[my_config.yaml:22]")
    assert not any(line.startswith("benchmark.num") for line in lines)  # code default: not listed


def test_resolving_leaves_torch_out() -> None:
    code = (
        "import sys\n"
        "from ad_config import load_experiment_config, load_llm_args, render_yaml\n"
        "cfg = load_experiment_config(['--args.world-size=2', '--args.transforms.export-to-gm.strict=true'])\n"
        "render_yaml(cfg); load_llm_args(world_size=2)\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_help(tmp_path: Path) -> None:
    proc = run_module("ad_config", "--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "--args.world-size" in proc.stdout and "--prompt.sp-kwargs.<key>" in proc.stdout
