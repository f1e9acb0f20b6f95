"""Per-sequence state caches (Mamba conv and SSM state, linear-attention state) and the cached ops on them."""

from . import torch_linear_attention  # noqa: F401 - registers torch_cached_gated_delta_rule / _linear_attention
from . import torch_mamba  # noqa: F401 - registers auto_deploy::torch_cached_causal_conv1d / torch_cached_ssm
