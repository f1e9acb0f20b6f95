"""Compile backends by name: torch-simple, torch-compile, torch-cudagraph, torch-opt."""

from .backends import CompileBackendRegistry, compile_model, resolve_compile_backend

__all__ = ["CompileBackendRegistry", "compile_model", "resolve_compile_backend"]
