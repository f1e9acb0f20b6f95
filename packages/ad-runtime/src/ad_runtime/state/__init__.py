"""Per-sequence state caches (Mamba conv and SSM state, gated delta-net state) and the cached ops on them."""

from . import torch_gated_delta  # noqa: F401 - registers auto_deploy::torch_cached_gated_delta_rule
from . import torch_mamba  # noqa: F401 - registers auto_deploy::torch_cached_causal_conv1d / torch_cached_ssm
