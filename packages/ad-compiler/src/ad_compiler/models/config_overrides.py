"""Apply `model_kwargs` to a HF config: recursive merge into nested sub-configs; unknown keys are errors."""

import difflib
import inspect
from typing import Any

from ..errors import CompileError


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _unknown_keys(base: dict[str, Any], overrides: dict[str, Any], allowed: set[str], prefix: str = "") -> list[str]:
    """Dotted names of override keys the config neither has nor accepts (typos, usually)."""
    unknown = []
    for key, value in overrides.items():
        if key not in base and key not in allowed:
            unknown.append(prefix + key)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            # Free-form dicts (rope_parameters, tp plans) accept new keys; sub-configs carry model_type.
            if "model_type" in base[key]:
                unknown += _unknown_keys(base[key], value, set(), f"{prefix}{key}.")
    return unknown


def _fit_layer_types(merged: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Keep per-layer lists consistent when only `num_hidden_layers` is overridden.

    A checkpoint's `layer_types` (sliding/full per layer) is validated against the layer count: keep
    its first n entries when shrinking; drop it when growing so the config derives it again.
    """
    n = overrides.get("num_hidden_layers")
    types = merged.get("layer_types")
    if isinstance(n, int) and "layer_types" not in overrides and isinstance(types, list) and len(types) != n:
        if len(types) > n:
            merged["layer_types"] = types[:n]
        else:
            del merged["layer_types"]
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            _fit_layer_types(merged[key], value)


def apply_model_kwargs(config: Any, model_kwargs: dict[str, Any]) -> Any:
    """A new config of the same class: `config` with `model_kwargs` deep-merged in.

    Unknown keys raise CompileError: a misspelt override would otherwise be silently ignored (HF configs
    accept any attribute). A key is known if the config's dict has it or its class's __init__ names it.
    """
    if not model_kwargs:
        return config
    base = config.to_dict()
    allowed = set(inspect.signature(type(config).__init__).parameters) - {"self", "kwargs"}
    unknown = _unknown_keys(base, model_kwargs, allowed)
    if unknown:
        hints = []
        for name in unknown:
            leaf = name.rsplit(".", 1)[-1]
            close = difflib.get_close_matches(leaf, sorted(set(base) | allowed), n=1, cutoff=0.6)
            hints.append(f"{name} (did you mean {close[0]!r}?)" if close else name)
        raise CompileError(f"model_kwargs: {type(config).__name__} has no key {', '.join(hints)}")
    merged = _deep_merge(base, model_kwargs)
    _fit_layer_types(merged, model_kwargs)
    new = type(config).from_dict(merged)
    # from_dict drops the runtime-only attention/experts choices; they are set again at build time.
    return new
