"""Helper for patches: swap a module attribute everywhere it was imported by name, and swap it back."""

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def replace_everywhere(original: Callable[..., Any], replacement: Callable[..., Any], prefix: str) -> Iterator[None]:
    """Point every `sys.modules` entry under `prefix` that holds `original` (by identity) at `replacement`.

    Modeling files do `from ...masking_utils import create_causal_mask`, so patching the defining module
    alone would not reach them.
    """
    swapped: list[tuple[Any, str]] = []
    for mod_name, mod in list(sys.modules.items()):
        if mod is None or not mod_name.startswith(prefix):
            continue
        for attr, value in list(vars(mod).items()):
            if value is original:
                setattr(mod, attr, replacement)
                swapped.append((mod, attr))
    try:
        yield
    finally:
        for mod, attr in swapped:
            setattr(mod, attr, original)
