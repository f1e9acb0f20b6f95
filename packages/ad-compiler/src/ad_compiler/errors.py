"""Errors the compiler raises for problems a user can cause."""


class CompileError(RuntimeError):
    """A transform, export or model build failed; the message says where and what to do."""


class MissingBackendError(CompileError):
    """A kernel backend was asked for that needs a package not installed (e.g. ad-runtime)."""
