"""Bad input gives one or two lines on stderr naming the key and its source, exit code 2, no traceback."""

from pathlib import Path

import pytest
from ad_config_helpers import run_module


def _fails(tmp_path: Path, *argv: str, env: dict[str, str] | None = None) -> str:
    proc = run_module("ad_config", *argv, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= 2, proc.stderr
    return proc.stderr


def test_missing_file(tmp_path: Path) -> None:
    err = _fails(tmp_path, "--yaml-extra", "nope.yaml")
    assert "nope.yaml: no such file" in err and "--yaml-extra" in err


def test_missing_inner_file(tmp_path: Path) -> None:
    err = _fails(tmp_path, "--args.yaml-extra", "inner.yaml")
    assert "inner.yaml: no such file" in err and "--args.yaml-extra" in err


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("args:\n  world_size: 2\n  max_seq_len: [1, 2\nprompt:\n  batch_size: 1\n")
    err = _fails(tmp_path, "--yaml-extra", "broken.yaml")
    assert "broken.yaml:4" in err and "YAML syntax error" in err


def test_unknown_field_in_yaml_suggests_closest(tmp_path: Path) -> None:
    (tmp_path / "typo.yaml").write_text("args:\n  world_size: 2\n  max_seq_lenn: 5\n")
    err = _fails(tmp_path, "--yaml-extra", "typo.yaml")
    assert "args.max_seq_lenn" in err and "'max_seq_len'" in err and "typo.yaml:3" in err


def test_unknown_cli_option_suggests_closest(tmp_path: Path) -> None:
    err = _fails(tmp_path, "--args.wrld-size=3")
    assert "--args.wrld-size" in err and "--args.world-size" in err


def test_unknown_top_level_option(tmp_path: Path) -> None:
    err = _fails(tmp_path, "--promt.batch-size=3")
    assert "--promt.batch-size" in err and "--prompt" in err


def test_unknown_transform_suggests_closest(tmp_path: Path) -> None:
    err = _fails(tmp_path, "--args.transforms.export-to-gmm.strict=true")
    assert "unknown transform 'export_to_gmm'" in err and "'export_to_gm'" in err
    assert "command line --args.transforms.export-to-gmm.strict" in err


def test_unknown_transform_key_suggests_closest(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("args:\n  transforms:\n    detect_sharding:\n      sharding_dimz: [tp]\n")
    err = _fails(tmp_path, "--yaml-extra", "t.yaml")
    assert "args.transforms.detect_sharding.sharding_dimz" in err and "'sharding_dims'" in err and "t.yaml:4" in err


def test_wrong_type(tmp_path: Path) -> None:
    err = _fails(tmp_path, "--args.world-size=abc")
    assert "args.world_size" in err and "integer" in err and "'abc'" in err and "--args.world-size" in err


def test_wrong_type_from_env(tmp_path: Path) -> None:
    err = _fails(tmp_path, env={"AD_ARGS__MAX_SEQ_LEN": "long"})
    assert "args.max_seq_len" in err and "environment AD_ARGS__MAX_SEQ_LEN" in err


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--args.compile-backend=torch-fast"], "args.compile_backend"),
        (["--args.mode=eager"], "args.mode"),
        (["--args.transforms.detect-sharding.sharding-dims=[tp, xp]"], "args.transforms.detect_sharding.sharding_dims"),
    ],
)
def test_value_outside_allowed_set(tmp_path: Path, argv: list[str], key: str) -> None:
    err = _fails(tmp_path, *argv)
    assert key in err and "Input should be" in err and "command line" in err


def test_tp_plan_strategy_outside_allowed_set(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        "args:\n  transforms:\n    detect_sharding:\n      manual_config:\n        tp_plan:\n          q_proj: diagonal\n"
    )
    err = _fails(tmp_path, "--yaml-extra", "s.yaml")
    assert "tp_plan.q_proj" in err and "'colwise'" in err and "s.yaml:6" in err


def test_argument_without_value(tmp_path: Path) -> None:
    err = _fails(tmp_path, "--args.world-size")
    assert "--args.world-size: expects a value" in err
    err = _fails(tmp_path, "--prompt.batch-size", "--dry-run")
    assert "--prompt.batch-size: expects a value" in err


def test_stray_positional_argument(tmp_path: Path) -> None:
    err = _fails(tmp_path, "model.yaml")
    assert "unexpected argument 'model.yaml'" in err


def test_yaml_top_level_not_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    err = _fails(tmp_path, "--yaml-extra", "list.yaml")
    assert "list.yaml:1" in err and "mapping" in err


def test_bad_log_level(tmp_path: Path) -> None:
    err = _fails(tmp_path, "--log-level", "loud")
    assert "--log-level" in err and "warning" in err
