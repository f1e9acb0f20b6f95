"""Helpers for patches: set attributes for the duration of a patch and restore them, in loaded modules."""

import contextlib
import sys
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from types import ModuleType
from typing import Any


@contextlib.contextmanager
def swapped(targets: Iterable[tuple[Any, str, Any]]) -> Iterator[None]:
    """Set each `(owner, attr, replacement)` until exit, then put every original back."""
    saved: list[tuple[Any, str, Any]] = []
    try:
        for owner, attr, replacement in targets:
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, replacement)
        yield
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)


def loaded(names: Iterable[str]) -> list[ModuleType]:
    """The named modules already imported: a model being exported has imported its modeling module already."""
    return [m for m in map(sys.modules.get, names) if m is not None]


def replace_everywhere(replacements: dict[Any, Any], prefix: str) -> AbstractContextManager[None]:
    """Point every attribute of a `sys.modules` entry under `prefix` that holds a key of `replacements` (by
    identity) at that key's value.

    Modeling files do `from ...masking_utils import create_causal_mask`, so patching the defining module
    alone would not reach them.
    """
    by_id = {id(original): new for original, new in replacements.items()}
    return swapped([(mod, attr, by_id[id(value)]) for name, mod in list(sys.modules.items())
                    if mod is not None and name.startswith(prefix)
                    for attr, value in list(vars(mod).items()) if id(value) in by_id])
