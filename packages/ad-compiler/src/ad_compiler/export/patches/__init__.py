"""Export patches: context managers that make export-hostile model code traceable, applied only around export."""

import contextlib
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import ClassVar

from ...errors import CompileError

PatchFactory = Callable[[], AbstractContextManager[None]]


class ExportPatchRegistry:
    """Patches by name; each entry builds a fresh context manager that patches on enter and reverts on exit."""

    _registry: ClassVar[dict[str, PatchFactory]] = {}

    @classmethod
    def register(cls, name: str) -> Callable[[PatchFactory], PatchFactory]:
        def wrap(fn: PatchFactory) -> PatchFactory:
            if name in cls._registry and cls._registry[name] is not fn:
                raise ValueError(f"export patch {name!r} registered twice")
            cls._registry[name] = fn
            return fn

        return wrap

    @classmethod
    def names(cls) -> list[str]:
        _import_builtin_patches()
        return sorted(cls._registry)

    @classmethod
    def get(cls, name: str) -> PatchFactory:
        _import_builtin_patches()
        if name not in cls._registry:
            raise CompileError(f"unknown export patch {name!r}; known: {sorted(cls._registry)}")
        return cls._registry[name]


def _import_builtin_patches() -> None:
    for m in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{m.name}")


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
