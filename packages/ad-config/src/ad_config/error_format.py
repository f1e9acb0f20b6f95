"""Turning pydantic validation errors into one-line messages that name the key and its source."""

from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import ConfigError
from .field_paths import model_at
from .merge import Path, dotted
from .origins import OriginMap
from .transform_config import closest_name


class FieldErrors(ConfigError):
    """Problems found by a validator below its own field: (relative path, reason) pairs."""

    def __init__(self, items: list[tuple[Path, str]]) -> None:
        self.items = items
        super().__init__("; ".join(f"{dotted(p)}: {r}" for p, r in items))


def explain(err: dict[str, Any], model: type[BaseModel], loc: Path) -> str:
    """The reason of one pydantic error, with a 'did you mean' for unknown keys."""
    if err["type"] == "extra_forbidden":
        owner = model_at(model, loc[:-1]) if len(loc) > 1 else model
        key = str(loc[-1])
        hint = closest_name(key, list(owner.model_fields)) if owner is not None else None
        return f"unknown field {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
    msg: str = err["msg"]
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _clean_loc(loc: tuple) -> Path:
    """Drop the union-member and function names pydantic adds to locations ('str', 'function-after[...]')."""
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in ("str", "int", "list", "dict")))


def _one_line(path: Path, reason: str, value: Any, origins: OriginMap, has_value: bool, prefix: Path) -> str:
    origin = origins.get(tuple(p for p in path if not isinstance(p, int))) if path else None
    parts = [f"{dotted(prefix + path)}: {reason}" if path else reason]
    if has_value and not isinstance(value, (dict, BaseModel)):
        parts.append(f"(got {value!r}" + (f" from {origin})" if origin else ")"))
    elif origin:
        parts.append(f"(from {origin})")
    return " ".join(parts)


def format_validation_error(
    error: ValidationError, model: type[BaseModel], origins: OriginMap, prefix: Path = ()
) -> str:
    """At most two lines: the first problem, then how many more there are and where.

    `prefix` is where `model` sits in the user's configuration (('args',) for LlmArgs in an experiment).
    """
    lines: list[str] = []
    for err in error.errors():
        loc = _clean_loc(tuple(err["loc"]))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldErrors):
            lines += [_one_line(loc + p, r, None, origins, False, prefix) for p, r in cause.items]
        elif isinstance(cause, ConfigError):
            # Already phrased by a nested settings object (it knew its own sources).
            lines.append(str(cause))
        else:
            has_value = err["type"] not in ("missing",)
            lines.append(_one_line(loc, explain(err, model, loc), err.get("input"), origins, has_value, prefix))
    lines = list(dict.fromkeys(lines))
    if len(lines) > 1:
        return f"{lines[0]}\n  (and {len(lines) - 1} more: {'; '.join(lines[1:3])}{' ...' if len(lines) > 3 else ''})"
    return lines[0] if lines else str(error)
