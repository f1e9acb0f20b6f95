"""ad_compiler package."""

# Registers torch.ops.auto_deploy.*: graphs saved by ad-export load after a plain `import ad_compiler`.
from . import custom_ops  # noqa: F401
