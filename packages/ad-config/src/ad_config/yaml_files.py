"""Reading configuration YAML files, with the line of every leaf, into plain dicts."""

from pathlib import Path as FsPath
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from .errors import ConfigError
from .merge import Path

BUILTIN_DEFAULT_YAML = FsPath(__file__).with_name("default.yaml")


def describe_file(path: str | FsPath) -> str:
    """How a file is named in messages: the built-in default by its bare name, others as given."""
    p = FsPath(path)
    try:
        if p.resolve() == BUILTIN_DEFAULT_YAML.resolve():
            return "default.yaml"
    except OSError:
        pass
    return str(path)


def _lines(node: yaml.Node, prefix: Path, out: dict[Path, int]) -> None:
    """Record the 1-based line of every leaf below `node`."""
    if isinstance(node, yaml.MappingNode) and node.value:
        constructor = SafeConstructor()
        for key_node, value_node in node.value:
            key = constructor.construct_object(key_node, deep=True)
            _lines(value_node, prefix + (key,), out)
    elif prefix:
        out[prefix] = node.start_mark.line + 1


def load_yaml_file(path: str | FsPath) -> tuple[dict[str, Any], dict[Path, int]]:
    """The mapping in `path` and the line of each leaf; ConfigError names file and line on failure."""
    name = describe_file(path)
    try:
        text = FsPath(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{name}: cannot read ({e.strerror})") from None
    return parse_yaml_text(text, name)


def parse_yaml_text(text: str, name: str) -> tuple[dict[str, Any], dict[Path, int]]:
    """Parse YAML `text` (called `name` in messages) into a mapping and the line of each leaf."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}" if mark else name
        what = " ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: YAML error: {e}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigError(f"{name}:{line}: the top level must be a mapping of keys, not {type(data).__name__}")
    lines: dict[Path, int] = {}
    _lines(node, (), lines)
    return data, lines


def scalar_from_text(text: str) -> Any:
    """Type a command-line or environment value like a YAML scalar: 10 int, true bool, 0.7 float, [1,2] list."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        # Not valid YAML on its own (e.g. 'a: b: c'): take it as the plain string it is.
        return text
