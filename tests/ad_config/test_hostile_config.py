"""Hostile and out-of-range configuration: every case fails fast with one line naming the key, value or file
(exit code 2), before anything is built; ordinary input next to it still works."""

import logging
import time
from pathlib import Path

import pytest
from ad_config import ConfigError, LlmArgs, load_llm_args, run_command
from ad_config.__main__ import main as ad_config_main
from ad_config_helpers import MY_CONFIG, resolve, run_module

# A "billion laughs" document: 9 levels of 9 aliases each, a few hundred bytes, ~4 * 10**8 values expanded.
BOMB = "".join(
    f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9 if prev else ['"lol"'] * 9) + "]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi")
)


def _fails(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run ad-config in-process; assert exit code 2, nothing on stdout and exactly one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        ad_config_main(list(argv))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    assert out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ad-config: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- YAML that would hang or crash ---------------------------------------------------------------


def test_alias_bomb_fails_in_under_a_second(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 500
    start = time.perf_counter()
    err = _fails(capsys, "--yaml-extra", str(bomb))
    assert time.perf_counter() - start < 1.0
    assert str(bomb) in err and "aliases expand" in err and "--yaml-extra" in err


def test_alias_bomb_in_nested_file_and_keyword_argument(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    start = time.perf_counter()
    err = _fails(capsys, "--args.yaml-extra", str(bomb))
    assert str(bomb) in err and "aliases expand" in err
    with pytest.raises(ConfigError, match="bomb.yaml: YAML aliases expand"):
        load_llm_args(yaml_extra=[str(bomb)])  # what LLM(yaml_extra=...) does
    assert time.perf_counter() - start < 2.0


def test_alias_bomb_as_a_command_line_value(capsys: pytest.CaptureFixture) -> None:
    levels = ["&a [1,1,1,1,1,1,1,1,1,1]"] + [f"&{c} [" + ",".join([f"*{p}"] * 10) + "]" for p, c in zip("abcd", "bcde")]
    err = _fails(capsys, f"--args.model-kwargs.x=[{', '.join(levels)}]")
    assert "--args.model-kwargs.x" in err and "aliases expand" in err


def test_alias_bomb_subprocess_exits_2(tmp_path: Path) -> None:
    (tmp_path / "bomb.yaml").write_text(BOMB)
    proc = run_module("ad_config", "--yaml-extra", "bomb.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "bomb.yaml" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_recursive_alias(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "rec.yaml").write_text("args:\n  model_kwargs:\n    x: &a [1, *a]\n")
    err = _fails(capsys, "--yaml-extra", str(tmp_path / "rec.yaml"))
    assert "rec.yaml:3" in err and "alias" in err


def test_deep_nesting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for depth in (100, 600):
        (tmp_path / "deep.yaml").write_text("args:\n  model_kwargs:\n    x: " + "[" * depth + "]" * depth + "\n")
        err = _fails(capsys, "--yaml-extra", str(tmp_path / "deep.yaml"))
        assert "deep.yaml" in err and "nested" in err


def test_a_few_aliases_still_work(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text(
        "args:\n  model_kwargs: {rope_parameters: &rope {rope_theta: 5000.0}, text_config: {rope_parameters: *rope}}\n"
        "prompt:\n  queries: &q [Hi, Hello]\n  sp_kwargs: &sp {max_tokens: 5, temperature: 0.0}\n"
    )
    cfg = resolve("--yaml-extra", str(tmp_path / "ok.yaml"))
    kwargs = cfg.args.model_kwargs
    assert kwargs["text_config"]["rope_parameters"] == kwargs["rope_parameters"] == {"rope_theta": 5000.0}
    assert cfg.prompt.queries == ["Hi", "Hello"] and cfg.prompt.sp_kwargs["max_tokens"] == 5


def test_non_utf8_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "latin1.yaml").write_bytes("args:\n  model: caf\u00e9\n".encode("latin-1"))
    err = _fails(capsys, "--yaml-extra", str(tmp_path / "latin1.yaml"))
    assert "latin1.yaml:2" in err and "not UTF-8" in err and "0xe9" in err


def test_control_character_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "ctrl.yaml").write_text("args:\n  model: a\x01b\n")
    err = _fails(capsys, "--yaml-extra", str(tmp_path / "ctrl.yaml"))
    assert "ctrl.yaml:2" in err and "#x0001" in err


# ---- numbers that would overflow later ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--args.max-seq-len=12345678901234567890123"], "args.max_seq_len: Input should be less than or equal to"),
        (["--args.seed=12345678901234567890123"], "args.seed: Input should be less than or equal to 1844674407370955"),
        (["--args.seed=-1"], "args.seed: Input should be greater than or equal to 0"),
        (["--args.attn-page-size=99999999999"], "args.attn_page_size"),
        (["--args.max-batch-size=99999999999"], "args.max_batch_size"),
        (["--args.max-num-tokens=99999999999"], "args.max_num_tokens"),
        (["--args.world-size=99999999"], "args.world_size"),
        (["--args.kv-cache-config.max-tokens=99999999999"], "args.kv_cache_config.max_tokens"),
        (["--args.cuda-graph-batch-sizes=[1, 99999999999]"], "args.cuda_graph_batch_sizes.1"),
        (["--args.sampling.max-tokens=99999999999"], "args.sampling.max_tokens"),
        (["--args.sampling.temperature=.inf"], "args.sampling.temperature: Input should be a finite number"),
        (["--args.sampling.temperature=.nan"], "args.sampling.temperature: Input should be a finite number"),
        (["--args.sampling.top-p=.nan"], "args.sampling.top_p"),
        (["--args.dist-timeout=.nan"], "args.dist_timeout"),
        (["--args.free-mem-ratio=.nan"], "args.free_mem_ratio"),
        (["--prompt.batch-size=99999999999"], "prompt.batch_size"),
        (["--prompt.sp-kwargs.seed=1180591620717411303424"], "prompt.sp_kwargs.seed"),
        (["--prompt.sp-kwargs.temperature=1e999"], "prompt.sp_kwargs.temperature: Input should be a finite number"),
        (["--benchmark.isl=99999999999"], "benchmark.isl"),
        (["--benchmark.enabled=true", "--benchmark.isl=2147483647"], "benchmark.isl + benchmark.osl"),
        (["--args.max-batch-size=100000", "--args.max-seq-len=100000"], "set max_num_tokens"),
    ],
)
def test_numbers_out_of_range(capsys: pytest.CaptureFixture, argv: list[str], needle: str) -> None:
    err = _fails(capsys, *argv)
    assert needle in err
    value = argv[-1].partition("=")[2].strip("[]").split(", ")[-1].lstrip(".")
    assert value in err  # the offending value is shown


def test_numbers_at_their_bounds_are_fine() -> None:
    args = LlmArgs(seed=2**64 - 1, max_seq_len=2**31 - 1, max_batch_size=1, sampling={"temperature": 0.0})
    assert args.seed == 2**64 - 1
    assert resolve("--prompt.sp-kwargs.seed=18446744073709551615").prompt.sp_kwargs["seed"] == 2**64 - 1


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ("--args.model-kwargs.num-hidden-layers=-1", "args.model_kwargs.num_hidden_layers"),
        ("--args.model-kwargs.num-attention-heads=0", "args.model_kwargs.num_attention_heads"),
        ("--args.model-kwargs.text-config.hidden-size=0", "args.model_kwargs.text_config.hidden_size"),
        ("--args.model-kwargs.vocab-size=2.5", "args.model_kwargs.vocab_size"),
    ],
)
def test_model_counts_must_be_positive(capsys: pytest.CaptureFixture, option: str, key: str) -> None:
    err = _fails(capsys, option)
    assert f"{key}: must be a positive integer" in err and f"got {option.partition('=')[2]}" in err
    assert option.partition("=")[0] in err


# ---- allowed sets echo the value -------------------------------------------------------------------------


def test_sharding_dims_echo_the_value(capsys: pytest.CaptureFixture) -> None:
    err = _fails(capsys, "--args.transforms.detect-sharding.sharding-dims=xx")
    assert "args.transforms.detect_sharding.sharding_dims" in err and "got 'xx'" in err and "'tp'" in err
    err = _fails(capsys, "--args.transforms.detect-sharding.sharding-dims=[tp, xx]")
    assert "got 'xx'" in err and "'tp', 'ep', 'bmm' or 'ssm'" in err


def test_transform_key_given_at_the_top_points_to_its_transform(capsys: pytest.CaptureFixture) -> None:
    err = _fails(capsys, "--args.sharding-dims", "xx")
    assert "--args.transforms.detect-sharding.sharding-dims" in err


def test_tp_plan_echoes_the_value(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "s.yaml").write_text(
        "args:\n  transforms:\n    detect_sharding:\n      manual_config:\n"
        "        tp_plan:\n          q_proj: diagonal\n"
    )
    err = _fails(capsys, "--yaml-extra", str(tmp_path / "s.yaml"))
    assert "tp_plan.q_proj" in err and "got 'diagonal'" in err and "'colwise'" in err and "s.yaml:6" in err


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--args.compile-backend", "torch-fast"),
        ("--args.attn-backend", "cuda"),
        ("--args.transforms.insert-cached-attention.backend", "cuda"),
        ("--args.transforms.match-attention-layout.attn-layout", "nsbd"),
        ("--args.dtype", "float8"),
        ("--args.mode", "eager"),
    ],
)
def test_every_allowed_set_error_echoes_the_value(capsys: pytest.CaptureFixture, option: str, value: str) -> None:
    err = _fails(capsys, f"{option}={value}")
    assert f"got {value!r}" in err and "Input should be" in err


# ---- --show-origin is an inspection ------------------------------------------------------------------


def test_show_origin_prints_and_never_runs(capsys: pytest.CaptureFixture) -> None:
    def run(_config: object) -> int:
        raise AssertionError("--show-origin ran the job")

    assert run_command(["--show-origin", "--args.world-size=2"], prog="build_and_run_ad", run=run) == 0
    out, _ = capsys.readouterr()
    assert "args.world_size = 2  [command line --args.world-size]" in out


# ---- GPU-only backends on an explicit CPU ----------------------------------------------------------------


@pytest.fixture
def no_triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests on a CPU run with TRITON_INTERPRET=1 (tests/conftest.py); a user's machine does not."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ("--args.attn-backend=triton", "args.transforms.insert_cached_attention.backend"),
        ("--args.attn-backend=flashinfer", "args.transforms.insert_cached_attention.backend"),
        ("--args.compile-backend=torch-cudagraph", "args.transforms.compile_model.backend"),
        ("--args.compile-backend=torch-opt", "args.transforms.compile_model.backend"),
        ("--args.transforms.fuse-rmsnorm.backend=triton", "args.transforms.fuse_rmsnorm.backend"),
    ],
)
def test_gpu_only_backend_on_cpu(
    capsys: pytest.CaptureFixture, no_triton_interpreter: None, option: str, key: str
) -> None:
    err = _fails(capsys, "--args.device=cpu", option)
    backend = option.partition("=")[2]
    assert f"{key}: backend {backend!r} needs a CUDA GPU" in err and "device 'cpu'" in err
    assert option.partition("=")[0] in err  # where the value came from


def test_readme_config_on_explicit_cpu(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_triton_interpreter: None
) -> None:
    (tmp_path / "my_config.yaml").write_text(MY_CONFIG)
    err = _fails(capsys, "--yaml-extra", str(tmp_path / "my_config.yaml"), "--args.device=cpu")
    assert "'triton' needs a CUDA GPU" in err and "device 'cpu'" in err and "my_config.yaml:" in err


def test_cpu_backends_and_many_ranks_on_cpu_are_fine(no_triton_interpreter: None) -> None:
    args = LlmArgs(device="cpu", world_size=4, attn_backend="torch", compile_backend="torch-compile")
    assert args.world_size == 4
    # A disabled transform's backend is never used; auto backends resolve per device at build time.
    LlmArgs(device="cpu", transforms={"compile_model": {"enabled": False, "backend": "torch-opt"}})
    LlmArgs(device="cpu", attn_backend="auto", compile_backend="auto")
    # Unknown device: no check here (the runtime resolves auto).
    assert LlmArgs(attn_backend="flashinfer").device == "auto"


def test_triton_on_cpu_with_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert LlmArgs(device="cpu", attn_backend="triton").attn_backend == "triton"
    with pytest.raises(ConfigError, match="'flashinfer' needs a CUDA GPU"):
        LlmArgs(device="cpu", attn_backend="flashinfer")


# ---- cache_dir ---------------------------------------------------------------------------------------


def test_ad_cache_dir_is_the_cache_dir_field(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AD_CACHE_DIR", "/tmp/ad-cache-test")
    with caplog.at_level(logging.WARNING):
        assert resolve().args.cache_dir == "/tmp/ad-cache-test"
        assert LlmArgs().cache_dir == "/tmp/ad-cache-test"
    assert "ignoring AD_CACHE_DIR" not in caplog.text
    assert LlmArgs(cache_dir="/elsewhere").cache_dir == "/elsewhere"  # a keyword beats the environment


def test_ad_plugins_is_no_setting_and_no_warning(monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # The README tells users of a source tree to set AD_PLUGINS (read by ad_compiler.plugins): not a typo to warn of.
    monkeypatch.setenv("AD_PLUGINS", "ad_runtime")
    monkeypatch.setenv("AD_PLUGNS", "x")
    with caplog.at_level(logging.WARNING):
        resolve()
    assert "ignoring AD_PLUGINS" not in caplog.text
    assert "ignoring AD_PLUGNS" in caplog.text  # a real stray variable still gets its warning
