"""build_and_run_ad at the edges of the configuration: GPU-only backends on a CPU, --show-origin, model configs
that would build an empty or broken model, and cache_dir. Each refusal is one line, before anything is built."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from ad_cli import build_and_run_ad
from ad_compiler.errors import CompileError
from ad_config import ConfigError, LlmArgs

MY_CONFIG = """\
# my_config.yaml (the README's)
args:
  world_size: 4
  max_seq_len: 2048
  transforms:
    insert_cached_attention:
      backend: triton
    compile_model:
      backend: torch-compile
prompt:
  batch_size: 8
  sp_kwargs: {max_tokens: 150, temperature: 0.8, top_k: 50}
"""

# A small Llama config: 4 heads of 16, 2 KV heads. Only config.json is read before the checks refuse.
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 256,
}  # fmt: skip

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No AD_ variables from the shell; no Triton interpreter (tests/conftest.py turns it on for CPU tests)."""
    for var in list(os.environ):
        if var.upper().startswith("AD_") and var.upper() != "AD_CACHE_DIR":
            monkeypatch.delenv(var)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _main(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        build_and_run_ad.main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("build_and_run_ad: error: "), err
    return lines[0]


# ---- GPU-only backends on a CPU ------------------------------------------------------------------


@needs_cpu_only
@pytest.mark.parametrize("dry_run", [False, True])
def test_readme_config_on_a_cpu_fails_in_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, dry_run: bool
) -> None:
    (tmp_path / "my_config.yaml").write_text(MY_CONFIG)
    monkeypatch.setattr(build_and_run_ad, "_run", lambda _c: pytest.fail("the job started"))
    start = time.perf_counter()
    argv = ["--yaml-extra", str(tmp_path / "my_config.yaml")] + (["--dry-run"] if dry_run else [])
    code, out, err = _main(capsys, *argv)
    assert time.perf_counter() - start < 5
    assert code == 2 and out == ""
    line = _one_error_line(err)
    assert "args.transforms.insert_cached_attention.backend: backend 'triton' needs a CUDA GPU" in line
    assert "no CUDA GPU visible" in line and "my_config.yaml:7" in line


@needs_cpu_only
def test_gpu_only_compile_backend_named_with_its_origin(capsys: pytest.CaptureFixture) -> None:
    code, _, err = _main(capsys, "--args.compile-backend=torch-opt", "--dry-run")
    line = _one_error_line(err)
    assert code == 2 and "'torch-opt' needs a CUDA GPU" in line and "--args.compile-backend" in line


def test_cpu_world_size_4_dry_run_is_fine(capsys: pytest.CaptureFixture) -> None:
    code, out, err = _main(capsys, "--args.world-size=4", "--args.device=cpu", "--dry-run")
    assert code == 0, err
    assert "world_size: 4" in out


def test_runtime_build_refuses_before_exporting(monkeypatch: pytest.MonkeyPatch) -> None:
    from ad_compiler.export import pipeline
    from ad_runtime.build import build_graph
    from ad_runtime.device_checks import check_backends_for_device

    args = LlmArgs(attn_backend="flashinfer")  # device auto
    on_cpu = args.model_copy(update={"device": "cpu"})  # (validation refuses that combination already)
    with pytest.raises(ConfigError, match=r"'flashinfer' needs a CUDA GPU, but the target is device 'cpu'"):
        check_backends_for_device(on_cpu, torch.device("cpu"))
    check_backends_for_device(args, torch.device("cuda", 0))  # a GPU target: nothing to say
    if torch.cuda.is_available():
        return
    monkeypatch.setattr(pipeline, "factory_from_args", lambda *a, **k: pytest.fail("the build started"))
    with pytest.raises(ConfigError, match=r"insert_cached_attention.backend: backend 'flashinfer' needs a CUDA GPU.*"
                                          r"cpu \(device 'auto', no CUDA GPU visible\)"):
        build_graph(args)


# ---- --show-origin ----------------------------------------------------------------------------------


def test_show_origin_prints_and_exits(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "my_config.yaml").write_text(MY_CONFIG)
    monkeypatch.setattr(build_and_run_ad, "_run", lambda _c: pytest.fail("--show-origin ran the job"))
    # Even a configuration refused for this machine shows where its values came from.
    code, out, err = _main(capsys, "--yaml-extra", str(tmp_path / "my_config.yaml"), "--show-origin")
    assert code == 0, err
    assert "args.transforms.insert_cached_attention.backend = \"triton\"  [" in out and "my_config.yaml:7]" in out


# ---- model configs that would build an empty or broken model -----------------------------------------


def _model_folder(tmp_path: Path, **changes: object) -> Path:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY, **changes}))
    return folder


def test_model_kwargs_layers_minus_one_exits_2(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_and_run_ad, "_run", lambda _c: pytest.fail("the job started"))
    code, _, err = _main(capsys, "--args.model-kwargs.num-hidden-layers=-1")
    line = _one_error_line(err)
    assert code == 2 and "args.model_kwargs.num_hidden_layers: must be a positive integer" in line and "-1" in line


def test_checkpoint_with_zero_heads_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _model_folder(tmp_path, num_attention_heads=0)
    code, _, err = _main(capsys, "--model", str(folder), "--args.device=cpu", "--args.attn-backend=torch")
    line = _one_error_line(err)
    # The model's own config is broken: a build failure (code 1, like a missing model), not a config mistake.
    assert code == 1 and f"{folder}/config.json: num_attention_heads: must be a positive integer, got 0" in line


def test_model_kwargs_heads_that_do_not_divide_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _model_folder(tmp_path)
    code, _, err = _main(
        capsys, "--model", str(folder), "--args.device=cpu", "--args.model-kwargs.num-key-value-heads=3"
    )
    line = _one_error_line(err)
    assert code == 2 and "model_kwargs.num_key_value_heads" in line and "(4)" in line and "(3)" in line


def test_factory_checks(tmp_path: Path) -> None:
    from ad_compiler.models.factory import ModelConfigError, ModelFactoryRegistry

    factory = ModelFactoryRegistry.get("AutoModelForCausalLM")
    folder = _model_folder(tmp_path)
    with pytest.raises(ModelConfigError, match=r"model_kwargs.num_hidden_layers: must be a positive integer, got -1"):
        factory(str(folder), model_kwargs={"num_hidden_layers": -1}).config
    with pytest.raises(ModelConfigError, match=r"model_kwargs.hidden_size: hidden_size \(66\) must be a multiple"):
        factory(str(folder), model_kwargs={"hidden_size": 66}).config
    assert issubclass(ModelConfigError, CompileError) and issubclass(ModelConfigError, ConfigError)
    (folder / "config.json").write_text(json.dumps({**TINY, "text_config": {"vocab_size": 0}}))
    with pytest.raises(CompileError, match=r"config.json: text_config.vocab_size: must be a positive integer"):
        factory(str(folder)).config
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CompileError, match=r"config.json:1: not valid JSON"):
        factory(str(folder)).config
    (folder / "config.json").write_text(json.dumps(TINY))
    assert factory(str(folder), model_kwargs={"num_hidden_layers": 1}).config.num_hidden_layers == 1


# ---- cache_dir ----------------------------------------------------------------------------------------


def test_cache_dir_holds_the_converted_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ad_compiler.export.pipeline import factory_from_args
    from ad_compiler.models import bundled

    gguf = bundled.bundled_gguf_path()
    key = bundled._cache_key(gguf)
    converted = bundled.cache_root() / key
    cache = tmp_path / "cache"
    if bundled.is_converted(converted):
        # Converting takes ~15 s; a folder already converted elsewhere is linked in, as the converter leaves it.
        (cache / key).mkdir(parents=True)
        for f in converted.iterdir():
            (cache / key / f.name).symlink_to(f)
    monkeypatch.setenv("AD_CACHE_DIR", str(tmp_path / "not-here"))  # the field wins over the variable
    factory = factory_from_args(LlmArgs(cache_dir=str(cache)), device="cpu")
    assert factory.folder == cache / key and bundled.is_converted(cache / key)
    assert not (tmp_path / "not-here").exists()
    # The variable reaches the same field (and so the factory) when no keyword sets it.
    monkeypatch.setenv("AD_CACHE_DIR", str(cache))
    assert factory_from_args(LlmArgs(), device="cpu").folder == cache / key
