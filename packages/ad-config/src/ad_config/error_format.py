"""Turning pydantic validation errors into one-line messages that name the key and its source."""

import typing
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from .errors import ConfigError
from .field_paths import model_at
from .merge import Path, dotted
from .origins import OriginMap
from .transform_config import closest_name


# Marks a FieldErrors item that has no offending value to show (an unknown transform name).
NO_VALUE: Any = object()

# Longest shown form of an offending value; a huge list or string is cut.
MAX_SHOWN = 80


class FieldErrors(ConfigError):
    """Problems found by a validator below its own field: (relative path, reason, offending value or NO_VALUE)."""

    def __init__(self, items: list[tuple[Path, str, Any]]) -> None:
        self.items = items
        super().__init__("; ".join(f"{dotted(p)}: {r}" for p, r, _ in self.items))


def shown(value: Any) -> str:
    """`repr(value)`, cut to MAX_SHOWN characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 3] + "..."


def explain(err: dict[str, Any], model: type[BaseModel], loc: Path) -> str:
    """The reason of one pydantic error, with a 'did you mean' for unknown keys."""
    if err["type"] == "extra_forbidden":
        owner = model_at(model, loc[:-1]) if len(loc) > 1 else model
        key = str(loc[-1])
        hint = closest_name(key, list(owner.model_fields)) if owner is not None else None
        return f"unknown field {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
    msg: str = err["msg"]
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if err["type"] == "list_type":
        choices = _list_choices(model, loc)
        if choices:
            msg += f" of {choices}"
    return msg


def validation_problems(error: ValidationError, model: type[BaseModel], prefix: Path = ()) -> list[tuple]:
    """FieldErrors items (path under `prefix`, reason, offending value) for the errors of validating a `model`."""
    return [(prefix + tuple(err["loc"]), explain(err, model, tuple(err["loc"])),
             NO_VALUE if err["type"] == "missing" else err.get("input", NO_VALUE)) for err in error.errors()]


def _list_choices(model: type[BaseModel], loc: Path) -> str | None:
    """'tp', 'ep' or 'bmm' when the field at `loc` is a list of string choices, else None."""
    owner = model_at(model, loc[:-1]) if len(loc) > 1 else model
    field = owner.model_fields.get(str(loc[-1])) if owner is not None and loc else None
    if field is None:
        return None
    for member in typing.get_args(field.annotation) or ():
        if typing.get_origin(member) is Literal:
            names = [repr(a) for a in typing.get_args(member)]
            return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]
    return None


def _clean_loc(loc: tuple) -> Path:
    """Drop the union-member and function names pydantic adds to locations ('str', 'function-after[...]')."""
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in ("str", "int", "list", "dict")))


def _one_line(path: Path, reason: str, value: Any, origins: OriginMap, prefix: Path) -> str:
    origin = origins.get(tuple(p for p in path if not isinstance(p, int))) if path else None
    parts = [f"{dotted(prefix + path)}: {reason}" if path else reason]
    if value is not NO_VALUE and not isinstance(value, (dict, BaseModel)):
        parts.append(f"(got {shown(value)}" + (f" from {origin})" if origin else ")"))
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
            lines += [_one_line(loc + p, r, v, origins, prefix) for p, r, v in cause.items]
        elif isinstance(cause, ConfigError):
            # Already phrased by a nested settings object (it knew its own sources).
            lines.append(str(cause))
        else:
            value = NO_VALUE if err["type"] == "missing" else err.get("input")
            lines.append(_one_line(loc, explain(err, model, loc), value, origins, prefix))
    return _join(lines) or str(error)


def format_field_problems(items: list[tuple[Path, str, Any]], origins: OriginMap, prefix: Path = ()) -> str:
    """FieldErrors-style (path, reason, value) items found outside validation, phrased like validation errors."""
    return _join([_one_line(p, r, v, origins, prefix) for p, r, v in items])


def _join(lines: list[str]) -> str:
    """At most two lines: the first problem, then how many more there are and where."""
    lines = list(dict.fromkeys(lines))
    if len(lines) > 1:
        return f"{lines[0]}\n  (and {len(lines) - 1} more: {'; '.join(lines[1:3])}{' ...' if len(lines) > 3 else ''})"
    return lines[0] if lines else ""
