"""Every transform config is an explicit class that documents itself: a docstring, a description on every key,
and all of it shown by `--help`."""

import ast
from pathlib import Path

import ad_config
from ad_config.command import run_command
from ad_config.transform_config import TRANSFORM_CONFIGS, TransformConfig


def test_every_transform_config_has_a_docstring_and_described_keys() -> None:
    assert len(TRANSFORM_CONFIGS) >= 30
    for name, cls in TRANSFORM_CONFIGS.items():
        assert cls.__doc__ and cls.__doc__ is not TransformConfig.__doc__, f"{name}: no docstring"
        missing = [key for key, field in cls.model_fields.items() if not field.description]
        assert not missing, f"{name}: keys without a description: {missing}"


def test_every_config_class_is_written_out_where_grep_finds_it() -> None:
    # Generated classes (type(...) in a loop) cannot be found by searching for their name.
    src = Path(ad_config.__file__).parent
    defined = {node.name for path in src.glob("transform_config*.py")
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)}
    for name, cls in TRANSFORM_CONFIGS.items():
        assert cls.__name__ in defined, f"{name}: class {cls.__name__} is not written out in a transform_config module"


def test_help_shows_every_transform_and_its_options(capsys) -> None:
    assert run_command(["--help"], "build_and_run_ad") == 0
    out = capsys.readouterr().out
    for name, cls in TRANSFORM_CONFIGS.items():
        assert f"  {name} [" in out, name
        for key, field in cls.model_fields.items():
            if key not in TransformConfig.model_fields and not isinstance(field.default_factory, type):
                # (a nested settings object, like a sharding plan, shows its own keys instead)
                flag = f"--args.transforms.{name.replace('_', '-')}.{key.replace('_', '-')}"
                line = next((ln for ln in out.splitlines() if flag in ln), None)
                assert line is not None and field.description[:40] in line, flag
    assert "--args.transforms.<name>.skip-on-error" in out
