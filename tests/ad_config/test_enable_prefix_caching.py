"""enable_prefix_caching: on by default, switched off from the command line, YAML or a keyword."""

from pathlib import Path

from ad_config import LlmArgs, load_llm_args
from ad_config_helpers import resolve


def test_on_by_default_and_off_from_every_layer(tmp_path: Path) -> None:
    assert LlmArgs().enable_prefix_caching is True and resolve().args.enable_prefix_caching is True
    assert LlmArgs.model_fields["enable_prefix_caching"].description  # shown by --help
    assert resolve("--args.enable-prefix-caching=false").args.enable_prefix_caching is False
    cfg = tmp_path / "off.yaml"
    cfg.write_text("args:\n  enable_prefix_caching: false\n")
    assert resolve("--yaml-extra", str(cfg)).args.enable_prefix_caching is False
    assert load_llm_args(enable_prefix_caching=False).enable_prefix_caching is False
