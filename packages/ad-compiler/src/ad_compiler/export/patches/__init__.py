"""Export patches: context managers that make export-hostile model code traceable, applied only around export."""

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

from ...registry import Registry

PatchFactory = Callable[[], AbstractContextManager[None]]


# Patches by name; each entry builds a fresh context manager that patches on enter and reverts on exit. One
# module of this package a patch (plugins.py imports them all).
ExportPatchRegistry: Registry[PatchFactory] = Registry("export patch")


@contextlib.contextmanager
def apply_export_patches(names: list[str] | None = None) -> Iterator[list[str]]:
    """Apply the named patches (all registered ones when None), yield their names, revert them all on exit."""
    selected = ExportPatchRegistry.names() if names is None else list(names)
    factories = [ExportPatchRegistry.get(n) for n in selected]  # fail before patching anything
    with contextlib.ExitStack() as stack:
        for f in factories:
            stack.enter_context(f())
        yield selected


__all__ = ["ExportPatchRegistry", "apply_export_patches"]
