"""Every command and YAML file of the expert-configuration spec page resolves as the page says."""

from pathlib import Path

from ad_config.transform_config import CompileModelConfig, DetectShardingConfig, ExportToGmConfig
from ad_config_helpers import resolve


def test_cli_model_parameters() -> None:
    cfg = resolve(
        "--model", "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "--args.model-kwargs.num-hidden-layers=10",
        "--args.model-kwargs.hidden-size=2048",
        "--args.tokenizer-kwargs.padding-side=left",
    )  # fmt: skip
    assert cfg.model == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert cfg.args.model == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert cfg.args.model_kwargs == {"num_hidden_layers": 10, "hidden_size": 2048}
    assert isinstance(cfg.args.model_kwargs["num_hidden_layers"], int)
    assert cfg.args.tokenizer_kwargs == {"padding_side": "left"}


def test_cli_runtime_and_backends() -> None:
    cfg = resolve(
        "--model", "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        "--args.world-size=2",
        "--args.compile-backend=torch-opt",
        "--args.attn-backend=flashinfer",
    )  # fmt: skip
    assert cfg.args.model == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert cfg.args.world_size == 2
    assert cfg.args.compile_backend == "torch-opt"
    assert cfg.args.attn_backend == "flashinfer"
    # Shortcuts are written into the transforms they mirror.
    assert cfg.args.transforms["compile_model"].backend == "torch-opt"
    assert cfg.args.transforms["insert_cached_attention"].backend == "flashinfer"


def test_cli_prompting_and_benchmarking() -> None:
    cfg = resolve(
        "--model", "microsoft/phi-4",
        "--prompt.batch-size=4",
        "--prompt.sp-kwargs.max-tokens=200",
        "--prompt.sp-kwargs.temperature=0.7",
        "--benchmark.enabled=true",
        "--benchmark.bs=8",
        "--benchmark.isl=1024",
    )  # fmt: skip
    assert cfg.prompt.batch_size == 4
    assert cfg.prompt.sp_kwargs == {"max_tokens": 200, "temperature": 0.7, "top_k": None}
    assert cfg.benchmark.enabled is True
    assert (cfg.benchmark.bs, cfg.benchmark.isl, cfg.benchmark.osl) == (8, 1024, 128)
    assert cfg.args.max_batch_size == 8  # max(default 8, prompt 4, benchmark 8)
    assert cfg.args.max_seq_len == 1024 + 128  # raised to isl + osl


def test_cli_space_separated_values_equal_equals_form() -> None:
    a = resolve("--args.world-size", "2", "--prompt.batch-size", "4", "--args.model-kwargs.hidden-size", "64")
    b = resolve("--args.world-size=2", "--prompt.batch-size=4", "--args.model-kwargs.hidden-size=64")
    assert a.model_dump() == b.model_dump()
    assert a.args.world_size == 2 and a.prompt.batch_size == 4 and a.args.model_kwargs == {"hidden_size": 64}


def test_single_yaml(spec_files: Path) -> None:
    cfg = resolve("--model", "meta-llama/Meta-Llama-3.1-8B-Instruct", "--yaml-extra", "my_config.yaml")
    a = cfg.args
    assert a.model == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert a.model_kwargs == {"num_hidden_layers": 12, "hidden_size": 1024}
    assert (a.world_size, a.max_seq_len, a.max_batch_size) == (4, 2048, 16)
    assert a.transforms["detect_sharding"].support_partial_config is True
    assert a.transforms["insert_cached_attention"].backend == "triton"
    assert a.transforms["compile_model"].backend == "torch-compile"
    assert a.attn_backend == "triton" and a.compile_backend == "torch-compile"
    # Keys the file does not name keep default.yaml's values.
    assert a.transforms["detect_sharding"].sharding_dims == ["tp", "ep", "bmm"]
    assert a.transforms["export_to_gm"].strict is False
    assert cfg.prompt.batch_size == 8
    assert cfg.prompt.sp_kwargs == {"max_tokens": 150, "temperature": 0.8, "top_k": 50}


def test_two_yaml_files_later_wins(spec_files: Path) -> None:
    cfg = resolve(
        "--model", "meta-llama/Meta-Llama-3.1-8B-Instruct", "--yaml-extra", "my_config.yaml", "production.yaml"
    )
    a = cfg.args
    assert (a.world_size, a.max_batch_size) == (8, 32)
    assert a.transforms["compile_model"].backend == "torch-opt" and a.compile_backend == "torch-opt"
    # Deep merge: what production.yaml does not mention survives from my_config.yaml.
    assert a.max_seq_len == 2048
    assert a.model_kwargs == {"num_hidden_layers": 12, "hidden_size": 1024}
    assert a.transforms["insert_cached_attention"].backend == "triton"
    assert cfg.prompt.batch_size == 8


def test_two_files_reversed_order(spec_files: Path) -> None:
    cfg = resolve("--yaml-extra", "production.yaml", "my_config.yaml")
    assert (cfg.args.world_size, cfg.args.max_batch_size) == (4, 16)
    assert cfg.args.compile_backend == "torch-compile"


def test_nested_args_yaml_extra(spec_files: Path) -> None:
    (spec_files / "autodeploy_overrides.yaml").write_text("max_seq_len: 4096\nattn_page_size: 32\nworld_size: 2\n")
    cfg = resolve(
        "--model", "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "--yaml-extra", "my_config.yaml",
        "--args.yaml-extra", "autodeploy_overrides.yaml",
    )  # fmt: skip
    # The outer file's args: section reaches LlmArgs as init kwargs and beats --args.yaml-extra.
    assert cfg.args.max_seq_len == 2048 and cfg.args.world_size == 4
    # Keys only the inner file sets still apply.
    assert cfg.args.attn_page_size == 32
    assert cfg.args.yaml_extra == ["autodeploy_overrides.yaml"]


def test_nested_cli_beats_both_yaml_levels(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiment_config.yaml").write_text(
        "args:\n  world_size: 4\n  max_seq_len: 1024\nprompt:\n  batch_size: 3\n"
    )
    (tmp_path / "autodeploy_config.yaml").write_text("world_size: 2\nmax_seq_len: 256\nmax_batch_size: 12\n")
    cfg = resolve(
        "--model", "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "--yaml-extra", "experiment_config.yaml",
        "--args.yaml-extra", "autodeploy_config.yaml",
        "--args.world-size=8",
    )  # fmt: skip
    assert cfg.args.world_size == 8
    assert cfg.args.max_seq_len == 1024  # outer YAML beats inner YAML
    assert cfg.args.max_batch_size == 12  # only the inner YAML sets it
    assert cfg.prompt.batch_size == 3


def test_deep_merge_example(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(
        "args:\n  model_kwargs:\n    num_hidden_layers: 10\n    hidden_size: 1024\n  max_seq_len: 2048\n"
    )
    (tmp_path / "override.yaml").write_text("args:\n  model_kwargs:\n    hidden_size: 2048\n  world_size: 4\n")
    cfg = resolve("--yaml-extra", "base.yaml", "override.yaml")
    assert cfg.args.model_kwargs == {"num_hidden_layers": 10, "hidden_size": 2048}
    assert cfg.args.max_seq_len == 2048
    assert cfg.args.world_size == 4


SHARDING = """\
args:
  transforms:
    detect_sharding:
      simple_shard_only: true
      sharding_source: [heuristic, manual]
      support_partial_config: false
      sharding_dims: [tp, ep, ssm]
      requires_shape_prop: true
      manual_config:
        head_dim: 128
        tp_plan:
          # mamba SSM layers
          in_proj: mamba
          out_proj: rowwise
          # attention layers
          q_proj: colwise
          k_proj: colwise
          v_proj: colwise
          o_proj: rowwise
          gate_proj: colwise
          up_proj: colwise
          down_proj: rowwise
          fc1_latent_proj: gather
          fc2_latent_proj: gather
          "model.layers.*.mlp.experts.*": colwise
"""


def test_sharding_keys_and_manual_tp_plan(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sharding.yaml").write_text(SHARDING)
    ds = resolve("--yaml-extra", "sharding.yaml").args.transforms["detect_sharding"]
    assert isinstance(ds, DetectShardingConfig)
    assert ds.simple_shard_only is True
    assert ds.sharding_source == ["heuristic", "manual"]
    assert ds.support_partial_config is False
    assert ds.sharding_dims == ["tp", "ep", "ssm"]
    assert ds.requires_shape_prop is True
    assert ds.manual_config.head_dim == 128
    assert ds.manual_config.tp_plan == {
        "in_proj": "mamba", "out_proj": "rowwise",
        "q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise",
        "gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise",
        "fc1_latent_proj": "gather", "fc2_latent_proj": "gather",
        "model.layers.*.mlp.experts.*": "colwise",
    }  # fmt: skip


def test_sharding_defaults() -> None:
    ds = resolve().args.transforms["detect_sharding"]
    assert ds.simple_shard_only is False
    assert ds.sharding_source == ["manual", "factory", "heuristic"]
    assert ds.support_partial_config is True
    assert ds.sharding_dims == ["tp", "ep", "bmm"]
    assert ds.requires_shape_prop is True


def test_transform_override_from_cli() -> None:
    cfg = resolve("--model", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "--args.transforms.export-to-gm.strict=true")
    export = cfg.args.transforms["export_to_gm"]
    assert isinstance(export, ExportToGmConfig)
    assert export.strict is True
    assert export.clone_state_dict is False  # the rest of default.yaml's entry stays
    assert list(cfg.args.transforms)[:2] == ["build_model", "export_to_gm"]  # order kept


def test_builtin_default_yaml_is_lowest_priority() -> None:
    cfg = resolve()
    assert isinstance(cfg.args.transforms["compile_model"], CompileModelConfig)
    assert cfg.args.transforms["resize_kv_cache"].free_mem_ratio == 0.8 == cfg.args.free_mem_ratio
    assert cfg.args.model is None and cfg.model is None  # the bundled SmolLM2
    assert (cfg.args.max_seq_len, cfg.args.max_batch_size, cfg.args.attn_page_size) == (512, 8, 64)
    assert cfg.args.device == "auto" and cfg.args.dtype == "auto"
