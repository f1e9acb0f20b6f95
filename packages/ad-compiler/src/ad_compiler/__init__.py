"""ad_compiler package."""

# Registers torch.ops.auto_deploy.*: graphs saved by ad-export load after a plain `import ad_compiler`.
from . import custom_ops  # noqa: F401
# Registers the torch kernel backends (torch_rmsnorm_fused, torch_fused_add_rmsnorm, torch_rope_with_cos_sin_cache)
# used after fusion.
from . import kernels_registry  # noqa: F401
