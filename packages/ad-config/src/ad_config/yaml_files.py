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


# Limits that keep a hostile file from hanging or exhausting memory: the text read, the values its
# aliases may add (a few hundred bytes of nested aliases, the "billion laughs", expand to billions of
# values in every later step: merging, origins, validation) and the nesting depth.
MAX_FILE_BYTES = 16 * 2**20
MAX_ALIAS_EXPANSION = 10_000
MAX_DEPTH = 64


class _Loader(yaml.SafeLoader):
    """SafeLoader; the document is composed first and checked by `_check_expansion` before construction."""


def _check_expansion(root: yaml.Node, name: str) -> None:
    """Refuse a node graph whose aliases add more than MAX_ALIAS_EXPANSION values, refer to themselves,
    or that nests deeper than MAX_DEPTH. Linear in the number of distinct nodes (sizes are memoised)."""
    size: dict[int, int] = {}  # id(node) -> values in its expanded subtree
    on_path: set[int] = set()
    # Iterative post-order walk: (node, depth, children pushed yet).
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, expanded = stack.pop()
        key = id(node)
        if expanded:
            on_path.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in _children(node))
            continue
        if key in size:
            continue
        if depth > MAX_DEPTH:
            raise ConfigError(f"{name}:{node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep")
        on_path.add(key)
        stack.append((node, depth, True))
        for child in _children(node):
            if id(child) in on_path:
                line = child.start_mark.line + 1
                raise ConfigError(f"{name}:{line}: a YAML alias refers to a value that contains it")
            if id(child) not in size:
                stack.append((child, depth + 1, False))
    if size[id(root)] - len(size) > MAX_ALIAS_EXPANSION:  # values beyond the distinct nodes
        raise ConfigError(
            f"{name}: YAML aliases expand the document by more than {MAX_ALIAS_EXPANSION} values "
            f"({size[id(root)]} in all); write the values out or use fewer nested aliases"
        )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _compose_and_construct(text: str, name: str) -> tuple[yaml.Node | None, Any]:
    """The node tree and the data of one YAML document, with alias expansion and depth bounded."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_expansion(node, name)
        return node, loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{name}: nested too deeply") from None
    finally:
        loader.dispose()


def load_yaml_file(path: str | FsPath) -> tuple[dict[str, Any], dict[Path, int]]:
    """The mapping in `path` and the line of each leaf; ConfigError names file and line on failure."""
    name = describe_file(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{name}: cannot read ({e.strerror or e})") from None
    except (ValueError, TypeError) as e:  # an embedded NUL byte, a path that is not text
        raise ConfigError(f"{name}: cannot read ({e})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{name}: larger than {MAX_FILE_BYTES // 2**20} MiB; not a configuration file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            f"{name}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file as UTF-8"
        ) from None
    return parse_yaml_text(text, name)


def parse_yaml_text(text: str, name: str) -> tuple[dict[str, Any], dict[Path, int]]:
    """Parse YAML `text` (called `name` in messages) into a mapping and the line of each leaf."""
    try:
        node, data = _compose_and_construct(text, name)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}" if mark else name
        what = " ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        code = ord(e.character) if isinstance(e.character, str) else e.character
        raise ConfigError(f"{name}:{line}: YAML error: {e.reason} (#x{code:04x})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: YAML error: {' '.join(str(e).split())}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        line = node.start_mark.line + 1 if node is not None else 1
        raise ConfigError(f"{name}:{line}: the top level must be a mapping of keys, not {type(data).__name__}")
    lines: dict[Path, int] = {}
    _lines(node, (), lines)
    return data, lines


def scalar_from_text(text: str, name: str = "value") -> Any:
    """Type a command-line or environment value like a YAML scalar: 10 int, true bool, 0.7 float, [1,2] list.

    `name` (the option or variable) appears in the error for a value whose aliases expand too far.
    """
    if not text.strip():
        return text
    try:
        return _compose_and_construct(text, name)[1]
    except yaml.YAMLError:
        # Not valid YAML on its own (e.g. 'a: b: c'): take it as the plain string it is.
        return text
