"""Precedence of the sources, shortcuts, keyword arguments, deep merge and origins."""

from pathlib import Path

import ad_config
import pytest
from ad_config import (
    AutoDeployConfig,
    BenchmarkConfig,
    ConfigError,
    DynamicYamlMixInForSettings,
    ExperimentConfig,
    LlmArgs,
    PromptConfig,
    deep_merge_dicts,
    load_llm_args,
)
from ad_config_helpers import resolve


def test_deep_merge_dicts() -> None:
    a = {"x": {"a": 1, "b": [1, 2], "c": {"d": 1}}, "y": 1, "z": [1]}
    b = {"x": {"b": [3], "c": {"e": 2}}, "z": {"now": "a mapping"}, "w": None}
    assert deep_merge_dicts(a, b) == {
        "x": {"a": 1, "b": [3], "c": {"d": 1, "e": 2}},
        "y": 1,
        "z": {"now": "a mapping"},
        "w": None,
    }
    assert a == {"x": {"a": 1, "b": [1, 2], "c": {"d": 1}}, "y": 1, "z": [1]}  # inputs untouched
    assert list(deep_merge_dicts({"p": 1, "q": 2}, {"q": {"r": 1}, "p": 3})) == ["p", "q"]
    assert deep_merge_dicts({"s": "${not.resolved}"}, {}) == {"s": "${not.resolved}"}


def test_precedence_cli_over_env_over_yaml_over_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(
        "args:\n  world_size: 2\n  max_seq_len: 300\n  max_batch_size: 3\nprompt:\n  batch_size: 1\n"
    )
    monkeypatch.setenv("AD_ARGS__MAX_SEQ_LEN", "400")
    monkeypatch.setenv("AD_MAX_BATCH_SIZE", "5")  # LlmArgs field names work for build_and_run_ad too
    cfg = resolve("--yaml-extra", "c.yaml", "--args.max-batch-size=6")
    assert cfg.args.world_size == 2  # YAML over default
    assert cfg.args.max_seq_len == 400  # env over YAML
    assert cfg.args.max_batch_size == 6  # command line over env
    assert cfg.args.attn_page_size == 64  # code default
    origins = cfg.origins()
    assert origins["args.world_size"] == "c.yaml:2"
    assert origins["args.max_seq_len"] == "environment AD_ARGS__MAX_SEQ_LEN"
    assert origins["args.max_batch_size"] == "command line --args.max-batch-size"
    # The line of compile_model's backend key in default.yaml (computed: other transforms come and go above it).
    lines = (Path(ad_config.__file__).parent / "default.yaml").read_text().splitlines()
    backend_line = lines.index("  compile_model:") + 3
    assert lines[backend_line - 1] == "    backend: auto"
    assert origins["args.transforms.compile_model.backend"] == f"default.yaml:{backend_line}"
    assert "args.attn_page_size" not in origins


def test_env_nested_and_free_form(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AD_ARGS__TRANSFORMS__EXPORT_TO_GM__STRICT", "true")
    monkeypatch.setenv("AD_ARGS__MODEL_KWARGS__NUM_HIDDEN_LAYERS", "3")
    monkeypatch.setenv("AD_PROMPT__SP_KWARGS__TEMPERATURE", "0.5")
    cfg = resolve()
    assert cfg.args.transforms["export_to_gm"].strict is True
    assert cfg.args.model_kwargs == {"num_hidden_layers": 3}
    assert cfg.prompt.sp_kwargs["temperature"] == 0.5


def test_llm_args_alone_reads_env_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.yaml").write_text("world_size: 2\nmax_seq_len: 128\n")
    monkeypatch.setenv("AD_MAX_SEQ_LEN", "256")
    args = LlmArgs(yaml_extra=[str(tmp_path / "a.yaml")])
    assert (args.world_size, args.max_seq_len) == (2, 256)
    assert LlmArgs(yaml_extra=[str(tmp_path / "a.yaml")], max_seq_len=64).max_seq_len == 64


def test_yaml_default_can_be_replaced(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("transforms:\n  build_model:\n    stage: factory\n")
    cfg = AutoDeployConfig(yaml_default=str(tmp_path / "mine.yaml"))
    assert list(cfg.transforms) == ["build_model"]
    assert cfg.attn_backend is None  # no transform to mirror
    assert AutoDeployConfig(yaml_default=None).transforms == {}


def test_shortcut_reports_transform_value_when_not_set() -> None:
    cfg = resolve(
        "--args.transforms.compile-model.backend=torch-cudagraph",
        "--args.transforms.resize-kv-cache.free-mem-ratio=0.5",
    )
    assert cfg.args.compile_backend == "torch-cudagraph"
    assert cfg.args.free_mem_ratio == 0.5


def test_explicit_shortcut_wins_over_transform_key() -> None:
    cfg = resolve("--args.transforms.compile-model.backend=torch-cudagraph", "--args.compile-backend=torch-simple")
    assert cfg.args.compile_backend == cfg.args.transforms["compile_model"].backend == "torch-simple"
    cfg = resolve("--args.cuda-graph-batch-sizes", "4", "1", "2", "4")
    assert cfg.args.cuda_graph_batch_sizes == cfg.args.transforms["compile_model"].cuda_graph_batch_sizes == [1, 2, 4]


def test_load_llm_args_keywords() -> None:
    args = load_llm_args(model="some/model", world_size=2, transforms={"export_to_gm": {"strict": True}})
    assert args.model == "some/model" and args.world_size == 2
    assert args.transforms["export_to_gm"].strict is True
    assert args.transforms["build_model"].stage.value == "factory"  # default.yaml still merged underneath
    assert args.origins()["world_size"] == "keyword argument world_size"
    with pytest.raises(ConfigError, match=r"unknown field 'wrld_size' \(did you mean 'world_size'\?\)"):
        load_llm_args(wrld_size=2)
    with pytest.raises(ConfigError, match="world_size"):
        load_llm_args(world_size=0)


def test_runtime_options_of_llm_args() -> None:
    args = load_llm_args(
        seed=7, trust_remote_code=True, sampling={"temperature": 0.0}, kv_cache_config={"max_tokens": 4096}
    )
    assert (args.seed, args.trust_remote_code, args.sampling.temperature, args.kv_cache_config.max_tokens) == (
        7,
        True,
        0.0,
        4096,
    )
    assert args.sampling.max_tokens == 100
    assert LlmArgs().trust_remote_code is False


def test_experiment_raises_limits() -> None:
    cfg = ExperimentConfig(prompt={"batch_size": 12}, args={"max_batch_size": 4, "max_seq_len": 100})
    assert cfg.args.max_batch_size == 12
    assert cfg.args.max_seq_len == 100  # benchmark off: unchanged
    cfg = ExperimentConfig(benchmark={"enabled": True, "bs": 16, "isl": 100, "osl": 20}, args={"max_seq_len": 64})
    assert (cfg.args.max_batch_size, cfg.args.max_seq_len) == (16, 120)
    assert cfg.origins()["args.max_batch_size"] == "raised to benchmark.bs"
    cfg = ExperimentConfig(benchmark={"enabled": False, "bs": 16, "isl": 100})
    assert (cfg.args.max_batch_size, cfg.args.max_seq_len) == (8, 512)


def test_model_copied_both_ways() -> None:
    assert ExperimentConfig(model="a/b").args.model == "a/b"
    assert ExperimentConfig(args={"model": "c/d"}).model == "c/d"
    assert ExperimentConfig(model="a/b", args={"model": "c/d"}).args.model == "a/b"


def test_prompt_and_benchmark_defaults() -> None:
    p = PromptConfig()
    assert p.batch_size == 2 and p.sp_kwargs == {"max_tokens": 100, "top_k": None, "temperature": 1.0}
    assert len(p.batch()) == 2
    assert PromptConfig(queries="hi", batch_size=3).batch() == ["hi", "hi", "hi"]
    with pytest.raises(ValueError, match="'prompt' or 'messages'"):
        PromptConfig(queries=[{"text": "x"}])
    b = BenchmarkConfig()
    assert (b.enabled, b.num, b.isl, b.osl, b.bs, b.results_path, b.store_results) == (
        False, 10, 2048, 128, 1, "./benchmark_results.json", False,
    )  # fmt: skip


def test_exports_are_settings_classes() -> None:
    assert issubclass(LlmArgs, AutoDeployConfig)
    assert issubclass(AutoDeployConfig, DynamicYamlMixInForSettings)
    assert issubclass(ExperimentConfig, DynamicYamlMixInForSettings)


def test_yaml_extra_inside_yaml_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.yaml").write_text("prompt:\n  batch_size: 1\nyaml_extra: [y.yaml]\n")
    with pytest.raises(ConfigError, match=r"x.yaml:3: yaml_extra cannot be set inside a YAML file"):
        resolve("--yaml-extra", "x.yaml")


def test_outer_yaml_can_name_inner_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "inner.yaml").write_text("attn_page_size: 16\nworld_size: 3\n")
    (tmp_path / "outer.yaml").write_text("args:\n  yaml_extra: [inner.yaml]\n  world_size: 2\n")
    cfg = resolve("--yaml-extra", "outer.yaml")
    assert (cfg.args.attn_page_size, cfg.args.world_size) == (16, 2)
    assert cfg.origins()["args.attn_page_size"] == "inner.yaml:1"


def test_repeated_yaml_extra_accumulates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("args:\n  world_size: 2\n")
    (tmp_path / "b.yaml").write_text("args:\n  max_seq_len: 99\n")
    cfg = resolve("--yaml-extra", "a.yaml", "--yaml-extra=b.yaml")
    assert cfg.yaml_extra == ["a.yaml", "b.yaml"]
    assert (cfg.args.world_size, cfg.args.max_seq_len) == (2, 99)


def test_text_fields_keep_text_and_flags() -> None:
    cfg = resolve(
        "--model", "123", "--dry-run", "--args.skip-loading-weights", "--args.tokenizer-kwargs.use-fast=false"
    )
    assert cfg.model == "123" and cfg.dry_run is True and cfg.args.skip_loading_weights is True
    assert cfg.args.tokenizer_kwargs == {"use_fast": False}
    assert resolve("--args.model-kwargs.rope-scaling={type: linear, factor: 2.0}").args.model_kwargs == {
        "rope_scaling": {"type": "linear", "factor": 2.0}
    }


def test_a_command_that_runs_no_prompts_keeps_max_batch_size() -> None:
    from ad_config import load_experiment_config

    argv = ["--args.max-batch-size=1", "--prompt.batch-size=4"]
    assert load_experiment_config(argv).args.max_batch_size == 4  # build_and_run_ad runs 4 prompts together
    assert load_experiment_config(argv, runs_prompts=False).args.max_batch_size == 1  # ad-serve
    assert load_experiment_config(argv).args.max_batch_size == 4  # the setting does not outlive the call
