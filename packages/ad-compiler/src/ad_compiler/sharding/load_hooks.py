"""Load-time slicing: a full checkpoint tensor is cut to this rank's shard before it is copied in."""

from typing import Any

import torch
from torch.fx import GraphModule

from .plan import ShardSpec

SPECS_ATTR = "_ad_shard_specs"


def _pre_hook(module: GraphModule, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    for target, (full_shape, spec) in getattr(module, SPECS_ATTR, {}).items():
        key = prefix + target
        value = state_dict.get(key)
        # An already-sharded tensor (local shape) passes through untouched.
        if isinstance(value, torch.Tensor) and tuple(value.shape) == full_shape:
            state_dict[key] = spec.slice(value)


def register_shard_load_hook(gm: GraphModule, specs: dict[str, tuple[tuple[int, ...], ShardSpec]]) -> None:
    """Remember `specs` on the module and register the hook once (later calls add specs)."""
    existing = getattr(gm, SPECS_ATTR, None)
    if existing is None:
        object.__setattr__(gm, SPECS_ATTR, dict(specs))
        gm.register_load_state_dict_pre_hook(_pre_hook)
    else:
        existing.update(specs)


def shard_specs(gm: GraphModule) -> dict[str, tuple[tuple[int, ...], ShardSpec]]:
    return dict(getattr(gm, SPECS_ATTR, {}))
