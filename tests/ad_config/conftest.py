"""Fixtures for ad_config tests: no AD_ variables from the developer's shell, spec files in a temp dir."""

import os
from pathlib import Path

import pytest
from ad_config_helpers import MY_CONFIG, PRODUCTION


@pytest.fixture(autouse=True)
def _no_ad_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start without AD_ variables so the developer's shell cannot change results."""
    for var in list(os.environ):
        if var.upper().startswith("AD_"):
            monkeypatch.delenv(var)


@pytest.fixture
def spec_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """my_config.yaml and production.yaml of the spec page, in the working directory."""
    (tmp_path / "my_config.yaml").write_text(MY_CONFIG)
    (tmp_path / "production.yaml").write_text(PRODUCTION)
    monkeypatch.chdir(tmp_path)
    return tmp_path
