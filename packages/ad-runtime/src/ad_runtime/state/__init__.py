"""Per-sequence state caches (Mamba conv and SSM state) and the cached ops that read and write them."""

from . import torch_mamba  # noqa: F401 - registers auto_deploy::torch_cached_causal_conv1d / torch_cached_ssm
