"""Canonical `torch.ops.auto_deploy.torch_*` ops: importing this package registers all of them."""

import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
