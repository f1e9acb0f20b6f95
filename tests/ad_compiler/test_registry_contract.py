"""The transform registry and default.yaml name the same transforms (runtime stages when ad_runtime imports)."""

import importlib.util
from pathlib import Path

import ad_config
import yaml
from ad_compiler.transform.interface import TransformRegistry
from ad_config.transform_config import TRANSFORM_CONFIGS, Stage


def _default_transforms() -> dict[str, dict]:
    path = Path(ad_config.__file__).parent / "default.yaml"
    return yaml.safe_load(path.read_text())["transforms"]


def _runtime_available() -> bool:
    if importlib.util.find_spec("ad_runtime") is None:
        return False
    import ad_runtime  # noqa: F401 - registers the cache_init/compile transforms

    return True


def test_registry_matches_default_yaml():
    yaml_names = _default_transforms()
    if _runtime_available():
        expected = set(yaml_names)
        registered = set(TransformRegistry.names())
    else:
        # Without ad-runtime only the compiler's stages (before cache_init) can be registered.
        compiler_stage = lambda n: Stage(yaml_names[n]["stage"]).order < Stage.CACHE_INIT.order  # noqa: E731
        expected = {n for n in yaml_names if compiler_stage(n)}
        registered = {n for n in TransformRegistry.names() if n in TRANSFORM_CONFIGS and compiler_stage(n)}
    assert registered == expected, f"missing: {sorted(expected - registered)}, extra: {sorted(registered - expected)}"


def test_every_registered_transform_has_a_config_and_stage():
    yaml_names = _default_transforms()
    for name in TransformRegistry.names():
        cfg = TRANSFORM_CONFIGS[name]()
        assert Stage(cfg.stage).value == yaml_names[name]["stage"], name


def test_every_transform_has_its_test_file():
    root = Path(__file__).parent / "transform"
    runtime_root = Path(__file__).parents[1] / "ad_runtime" / "transform"
    for name in _default_transforms():
        files = [root / f"test_{name}.py", runtime_root / f"test_{name}.py"]
        assert any(f.exists() for f in files), f"no test file for transform {name}"
