"""Deep merge of configuration mappings (OmegaConf) and leaf-path helpers."""

from typing import Any

from omegaconf import OmegaConf

Path = tuple[str | int, ...]

# Values that are not plain YAML data (pydantic models passed as keyword arguments, dates) ride
# through the merge untouched instead of making OmegaConf fail.
_FLAGS = {"allow_objects": True}


def _drop_conflicts(a: dict, b: dict) -> dict:
    """Copy of `a` without keys whose container kind differs from `b`'s (OmegaConf would refuse to merge them)."""
    out = dict(a)
    for key, new in b.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out[key] = _drop_conflicts(old, new)
        elif isinstance(new, dict) or isinstance(old, (dict, list)):
            # b replaces this value wholesale, so a's old value must not take part in the merge.
            out.pop(key, None)
    return out


def deep_merge_dicts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Merge `b` over `a`: mappings merge key by key; scalars and lists in `b` replace `a`'s.

    Neither input is modified. Key order: `a`'s keys first, then keys only `b` has.
    """
    base = OmegaConf.create(_drop_conflicts(a, b), flags=_FLAGS)
    top = OmegaConf.create(b, flags=_FLAGS)
    merged = OmegaConf.to_container(OmegaConf.merge(base, top), resolve=False)
    # Keys that _drop_conflicts removed move to the end; put them back in a's order.
    return _reorder(merged, a)


def _reorder(merged: dict, a: dict) -> dict:
    """`merged` with keys in `a`'s order first (recursively), then the rest."""
    out: dict = {}
    for key in a:
        if key in merged:
            value = merged[key]
            out[key] = _reorder(value, a[key]) if isinstance(value, dict) and isinstance(a[key], dict) else value
    for key, value in merged.items():
        if key not in out:
            out[key] = value
    return out


def leaf_paths(data: Any, prefix: Path = ()) -> dict[Path, Any]:
    """Every leaf of nested mappings by path; an empty mapping, a list or a scalar is a leaf."""
    if isinstance(data, dict) and data:
        out: dict[Path, Any] = {}
        for key, value in data.items():
            out.update(leaf_paths(value, prefix + (key,)))
        return out
    return {prefix: data} if prefix else {}


def set_path(data: dict, path: Path, value: Any) -> None:
    """Set `data[p0][p1]...` = value, creating (or replacing non-mapping) intermediate levels."""
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def get_path(data: dict, path: Path, default: Any) -> Any:
    """The value at `path` in nested dicts, or `default` where the path does not lead to one."""
    node: Any = data
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def dotted(path: Path) -> str:
    """`("args", "world_size")` -> `args.world_size`."""
    return ".".join(str(p) for p in path)
