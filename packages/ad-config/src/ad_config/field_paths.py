"""Finding the declared type at a dotted path of a settings model, and typing text values for it."""

import types
import typing
from enum import Enum
from pathlib import PurePath
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel

from .errors import ConfigError
from .merge import Path
from .transform_config import TRANSFORM_CONFIGS, TransformConfig, closest_name
from .yaml_files import scalar_from_text

FREE_FORM = object()  # marker: the path leads into a free-form dictionary


def unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and `| None` (a value can always be given as null where None is allowed)."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return unwrap(members[0])
    return annotation


def _members(annotation: Any) -> list[Any]:
    ann = unwrap(annotation)
    if typing.get_origin(ann) in (Union, types.UnionType):
        return [unwrap(a) for a in typing.get_args(ann) if a is not type(None)]
    return [ann]


def is_model(annotation: Any) -> bool:
    ann = unwrap(annotation)
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def is_mapping(annotation: Any) -> bool:
    ann = unwrap(annotation)
    return ann is dict or typing.get_origin(ann) is dict


def is_list(annotation: Any) -> bool:
    return any(m is list or typing.get_origin(m) in (list, tuple, set) for m in _members(annotation))


def _is_text(ann: Any) -> bool:
    if ann is str or (isinstance(ann, type) and issubclass(ann, (PurePath, Enum))):
        return True
    return typing.get_origin(ann) is Literal and all(isinstance(a, str) for a in typing.get_args(ann))


def is_text(annotation: Any) -> bool:
    """A value of this type is written as plain text: a str, a path, a string choice (or a union with one)."""
    return any(_is_text(m) for m in _members(annotation))


def list_item_is_text(annotation: Any) -> bool:
    for m in _members(annotation):
        if typing.get_origin(m) in (list, tuple, set):
            args = typing.get_args(m)
            return bool(args) and is_text(args[0])
    return False


def model_at(model: type[BaseModel], path: Path) -> type[BaseModel] | None:
    """The model class that holds the keys at `path` (transform names lead to their config class)."""
    current: type[BaseModel] = model
    rest = list(path)
    while rest:
        key = rest.pop(0)
        field = current.model_fields.get(str(key))
        if field is None:
            return None
        ann = unwrap(field.annotation)
        if is_model(ann):
            current = ann
        elif str(key) == "transforms" and is_mapping(ann):
            if not rest:
                return None
            cls = TRANSFORM_CONFIGS.get(str(rest.pop(0)))
            if cls is None:
                return None
            current = cls
        else:
            return None
    return current


def resolve(model: type[BaseModel], parts: list[str], spelled: str) -> tuple[Path, Any]:
    """Map user-spelled key parts to a field path and its annotation (FREE_FORM inside dicts).

    `spelled` is how the user wrote the key, for messages. Unknown names raise ConfigError with the
    closest valid name.
    """
    current: type[BaseModel] = model
    path: list[str] = []
    for i, part in enumerate(parts):
        name = part.replace("-", "_")
        field = current.model_fields.get(name)
        if field is None:
            hint = closest_name(name, list(current.model_fields))
            where = f" in {'.'.join(path)}" if path else ""
            owner = _transform_owning(name) if "transforms" in current.model_fields else None
            if owner is not None:
                # A transform's own key given as if it were a top-level option (--args.sharding-dims).
                hint = ".".join(path + ["transforms", owner, name])
            if hint and spelled.startswith("--"):
                hint = "--" + hint.replace("_", "-") if owner else "--" + ".".join(path + [hint]).replace("_", "-")
            extra = f" (did you mean {hint!r}?)" if hint else ""
            raise ConfigError(f"{spelled}: unknown option {name!r}{where}{extra}")
        path.append(name)
        ann = field.annotation
        last = i == len(parts) - 1
        if last:
            return tuple(path), ann
        if is_model(ann):
            current = unwrap(ann)
        elif is_mapping(ann):
            # Keys of free-form dicts follow YAML spelling: kebab-case becomes snake_case.
            return tuple(path) + tuple(p.replace("-", "_") for p in parts[i + 1 :]), FREE_FORM
        else:
            raise ConfigError(f"{spelled}: {'.'.join(path)!r} is a single value and has no sub-keys")
    return tuple(path), model


def _transform_owning(key: str) -> str | None:
    """The one transform whose config has its own key `key` (not a key every transform has), else None."""
    if key in TransformConfig.model_fields:
        return None
    owners = [n for n, cls in TRANSFORM_CONFIGS.items() if key in cls.model_fields]
    return owners[0] if len(owners) == 1 else None


def type_value(annotation: Any, tokens: list[str], spelled: str) -> Any:
    """Turn the text given for a field into data for pydantic to validate.

    Text-like fields keep the text as is ("123" stays a model name); anything else is typed like a
    YAML scalar. List fields take several tokens. A bare bool flag means true.
    """
    if annotation is FREE_FORM:
        if len(tokens) != 1:
            raise _arity(tokens, spelled)
        return scalar_from_text(tokens[0], spelled)
    if not tokens:
        if unwrap(annotation) is bool:
            return True
        raise ConfigError(f"{spelled}: expects a value")
    if is_list(annotation):
        item_text = list_item_is_text(annotation)
        if len(tokens) > 1:
            return [t if item_text else scalar_from_text(t, spelled) for t in tokens]
        as_text = item_text and not tokens[0].lstrip().startswith("[")
        value = tokens[0] if as_text else scalar_from_text(tokens[0], spelled)
        return value if isinstance(value, list) or (not item_text and value is None) else [value]
    if len(tokens) != 1:
        raise _arity(tokens, spelled)
    if is_text(annotation) and not is_model(annotation):
        return tokens[0]
    return scalar_from_text(tokens[0], spelled)


def _arity(tokens: list[str], spelled: str) -> ConfigError:
    if not tokens:
        return ConfigError(f"{spelled}: expects a value")
    return ConfigError(f"{spelled}: expects one value, got {len(tokens)}: {' '.join(tokens)}")
