"""Helpers for ad_config tests: the spec page's YAML files, in-process and subprocess resolution."""

import os
import subprocess
import sys
from pathlib import Path

from ad_config import ExperimentConfig, load_experiment_config

MY_CONFIG = """\
# my_config.yaml
args:
  model_kwargs:
    num_hidden_layers: 12
    hidden_size: 1024
  world_size: 4
  max_seq_len: 2048
  max_batch_size: 16
  transforms:
    detect_sharding:
      support_partial_config: true
    insert_cached_attention:
      backend: triton
    compile_model:
      backend: torch-compile

prompt:
  batch_size: 8
  sp_kwargs:
    max_tokens: 150
    temperature: 0.8
    top_k: 50
"""

PRODUCTION = """\
# production.yaml
args:
  world_size: 8
  max_batch_size: 32
  transforms:
    compile_model:
      backend: torch-opt
"""


def resolve(*argv: str) -> ExperimentConfig:
    return load_experiment_config(list(argv))


def run_module(module: str, *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    """Run `python -m module argv...` with a clean AD_ environment; returns the CompletedProcess."""
    full_env = {k: v for k, v in os.environ.items() if not k.upper().startswith("AD_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )
