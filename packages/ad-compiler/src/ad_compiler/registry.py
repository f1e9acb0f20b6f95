"""One registry shape for every kind of named plug-in: transforms, model factories, export patches, kernels, and
the runtime's attention and compile backends. A registry imports no implementation: built-ins and plugins
register themselves when `ad_compiler.plugins.load_builtins_and_plugins` imports them, before the first lookup."""

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import CompileError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name. `register(name)` decorates a class or function; `get(name)` returns it or
    raises a CompileError that names the kind, the closest known name and every known one."""

    def __init__(self, kind: str, on_register: Callable[[str, T], None] | None = None,
                 missing_hint: Callable[[str], str | None] | None = None):
        self.kind = kind
        self.entries: dict[str, T] = {}
        self._on_register = on_register  # e.g. tell a transform class its registry key
        self._missing_hint = missing_hint  # a sentence for names some other package would provide

    def register(self, name: str) -> Callable[[T], T]:
        def wrap(entry: T) -> T:
            self.add(name, entry)
            return entry

        return wrap

    def add(self, name: str, entry: T, replace: bool = False) -> None:
        old = self.entries.get(name)
        if old is not None and old is not entry and not replace:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        if self._on_register is not None:
            self._on_register(name, entry)
        self.entries[name] = entry

    def get(self, name: str) -> T:
        _load()
        if name in self.entries:
            return self.entries[name]
        hint = self._missing_hint(name) if self._missing_hint is not None else None
        if hint:
            raise CompileError(f"no {self.kind} registered as {name!r} ({hint})")
        close = difflib.get_close_matches(name, list(self.entries), n=1, cutoff=0.5)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        raise CompileError(f"unknown {self.kind} {name!r}{guess}; known: {', '.join(sorted(self.entries)) or 'none'}")

    def has(self, name: str) -> bool:
        _load()
        return name in self.entries

    def names(self) -> list[str]:
        _load()
        return sorted(self.entries)


def _load() -> None:
    from .plugins import load_builtins_and_plugins  # the one place that names implementations

    load_builtins_and_plugins()
