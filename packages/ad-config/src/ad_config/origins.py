"""Where each configuration leaf came from: layered origin maps that mirror the deep merge."""

import json
from typing import Any

from .merge import Path, dotted, leaf_paths


def _overlaps(a: Path, b: Path) -> bool:
    """One path is a prefix of (or equal to) the other."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


class OriginMap:
    """Leaf path -> origin label, updated layer by layer from lowest to highest priority.

    A higher layer that sets a leaf (or a whole subtree) shadows whatever lower layers said about
    that leaf, its parents and its children: exactly what the deep merge does to the values.
    """

    def __init__(self, origins: dict[Path, str] | None = None) -> None:
        self._origins: dict[Path, str] = dict(origins or {})

    def overlay(self, layer: dict[Path, str]) -> None:
        """Apply a higher-priority layer's labels."""
        for path in layer:
            for old in [p for p in self._origins if _overlaps(p, path)]:
                del self._origins[old]
        self._origins.update(layer)

    def set(self, path: Path, label: str) -> None:
        """Record one derived value (shadowing anything below or above it)."""
        self.overlay({path: label})

    def get(self, path: Path) -> str | None:
        """Label of `path`, of the leaf above it, or (for a subtree) of its first leaf below."""
        for n in range(len(path), 0, -1):
            if path[:n] in self._origins:
                return self._origins[path[:n]]
        below = [label for p, label in self._origins.items() if p[: len(path)] == path]
        return below[0] if below else None

    def subtree(self, prefix: Path) -> dict[Path, str]:
        """Labels under `prefix`, with the prefix stripped."""
        n = len(prefix)
        return {p[n:]: label for p, label in self._origins.items() if p[:n] == prefix and len(p) > n}

    def replace_subtree(self, prefix: Path, labels: dict[Path, str]) -> None:
        """Drop everything under `prefix`, then add `labels` (relative to it)."""
        for old in [p for p in self._origins if p[: len(prefix)] == prefix]:
            del self._origins[old]
        self._origins.update({prefix + p: label for p, label in labels.items()})

    def items(self) -> list[tuple[Path, str]]:
        return list(self._origins.items())


def leaf_labels(path: Path, value: Any, label: str) -> dict[Path, str]:
    """`label` for every leaf of `value` set at `path` (`path` itself for a scalar, a list or an empty mapping)."""
    return {path + sub: label for sub in (leaf_paths(value) or {(): None})}


def format_origins(values: dict[str, Any], origins: OriginMap) -> list[str]:
    """`key = value  [origin]` lines for every leaf that has an origin, in the order of `values`."""
    lines = []
    known = dict(origins.items())
    for path, value in leaf_paths(values).items():
        # Its own label, else that of the closest labelled parent (a list or mapping set as a whole).
        label = next((known[path[:n]] for n in range(len(path), 0, -1) if path[:n] in known), None)
        if label is not None:
            lines.append(f"{dotted(path)} = {json.dumps(value)}  [{label}]")
    return lines
