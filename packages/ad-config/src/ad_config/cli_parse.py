"""The dot-notation command line (`--args.world-size=2`, `--yaml-extra a.yaml b.yaml`) into init kwargs."""

import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from .errors import ConfigError
from .field_paths import is_mapping, is_model, resolve, type_value, unwrap
from .merge import Path, get_path, set_path
from .origins import OriginMap, leaf_labels

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class CliOptions:
    """Options of the commands themselves, not part of the configuration."""

    show_origin: bool = False
    log_level: str = "warning"
    help: bool = False


@dataclass
class ParsedArgs:
    values: dict[str, Any]
    origins: dict[Path, str]
    options: CliOptions


def _split(argv: list[str]) -> list[tuple[str, list[str]]]:
    """(key, value tokens) per option; values run until the next `--` token."""
    out: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            out.append(("help", []))
            i += 1
            continue
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: options are written --key=value or --key value")
        key, eq, inline = tok[2:].partition("=")
        if eq:
            out.append((key, [inline]))
            i += 1
            continue
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        out.append((key, argv[i + 1 : j]))
        i = j
    return out


def _flag(tokens: list[str], spelled: str) -> bool:
    if not tokens:
        return True
    if len(tokens) == 1 and tokens[0].lower() in ("true", "false", "1", "0", "yes", "no"):
        return tokens[0].lower() in ("true", "1", "yes")
    raise ConfigError(f"{spelled}: expects true or false, got {' '.join(tokens)!r}")


def parse_argv(argv: list[str], model: type[BaseModel]) -> ParsedArgs:
    """Parse `argv` into nested init kwargs for `model`, with a label per leaf. Later options win."""
    values: dict[str, Any] = {}
    origins = OriginMap()
    options = CliOptions()
    for key, tokens in _split(argv):
        spelled = f"--{key}"
        norm = key.replace("_", "-")
        if norm == "help":
            options.help = True
        elif norm == "show-origin":
            options.show_origin = _flag(tokens, spelled)
        elif norm == "log-level":
            if len(tokens) != 1 or tokens[0].lower() not in LOG_LEVELS:
                got = " ".join(tokens) or "nothing"
                raise ConfigError(f"{spelled}: expects one of {', '.join(LOG_LEVELS)}, got {got!r}")
            options.log_level = tokens[0].lower()
        else:
            if not key or any(not p for p in key.split(".")):
                raise ConfigError(f"{spelled}: malformed option name")
            path, annotation = resolve(model, key.split("."), spelled)
            value = type_value(annotation, tokens, spelled)
            if path[-1] == "yaml_extra" and isinstance(value, list):
                # Repeating --yaml-extra adds files rather than forgetting the earlier ones.
                value = get_path(values, path, []) + value
            set_path(values, path, value)
            origins.overlay(leaf_labels(path, value, f"command line {spelled}"))
    return ParsedArgs(values, dict(origins.items()), options)


def _type_name(annotation: Any) -> str:
    ann = unwrap(annotation)
    if typing.get_origin(ann) is Literal:
        return "|".join(str(a) for a in typing.get_args(ann))
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def help_lines(model: type[BaseModel], prefix: str = "", skip: frozenset[str] = frozenset(),
               indent: str = "  ") -> list[str]:
    """One line per option: `--args.world-size  int = 1  Number of ranks ...` (fields in `skip` left out)."""
    lines: list[str] = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        flag = f"{prefix}{name.replace('_', '-')}"
        if is_model(field.annotation):
            lines += help_lines(unwrap(field.annotation), f"{flag}.", indent=indent)
            continue
        default = field.get_default(call_default_factory=True)
        shown = f" = {default!r}" if not (isinstance(default, (dict, list)) and len(repr(default)) > 40) else ""
        hint = ".<key>" if is_mapping(field.annotation) else ""
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"{indent}--{flag}{hint}  {_type_name(field.annotation)}{shown}{desc}")
    return lines
