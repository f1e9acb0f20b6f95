"""Attention backends by name, with lazy import of optional ones and the `auto` choice."""

import importlib
import importlib.util
import logging

import torch
from ad_compiler.errors import CompileError
from ad_compiler.registry import Registry

from .descriptor import AttentionDescriptor

logger = logging.getLogger(__name__)

# Backends living in their own module, imported only when asked for (they may need optional packages).
_LAZY_MODULES = {
    "torch": "ad_runtime.attention.torch_backend",
    "triton": "ad_runtime.attention.triton_backend",
    "flashinfer": "ad_runtime.attention.flashinfer_backend",
}
_INSTALL_HINTS = {
    "flashinfer": "install it with `pip install 'ad-runtime[flashinfer]'` (needs a CUDA GPU)",
    "triton": "install triton (`pip install triton`)",
}

# Backends whose kernels exist only for CUDA GPUs (triton also runs on a CPU under TRITON_INTERPRET=1).
GPU_ONLY = {"flashinfer"}


def _set_name(name: str, descriptor: type[AttentionDescriptor]) -> None:
    descriptor.name = name


class _AttentionBackends(Registry[type[AttentionDescriptor]]):
    """The generic registry, plus lazy import of the backends that live in their own module."""

    def get(self, name: str) -> type[AttentionDescriptor]:
        if name not in self.entries and name in _LAZY_MODULES:
            try:
                importlib.import_module(_LAZY_MODULES[name])
            except ImportError as e:
                hint = _INSTALL_HINTS.get(name, "check that ad-runtime is fully installed")
                raise CompileError(f"attention backend {name!r} is not available ({e}); {hint}") from e
        if name not in self.entries:
            known = sorted(set(self.entries) | set(_LAZY_MODULES))
            raise CompileError(f"unknown attention backend {name!r}; choose one of {known} or 'auto'")
        return self.entries[name]

    def names(self) -> list[str]:
        return sorted(set(self.entries) | set(_LAZY_MODULES))


# `AttentionRegistry.register("name")` decorates an AttentionDescriptor subclass; `get("name")` returns it.
AttentionRegistry = _AttentionBackends("attention backend", on_register=_set_name)


def _usable(name: str) -> bool:
    try:
        AttentionRegistry.get(name)
        return True
    except CompileError as e:
        logger.info("attention backend %s not usable: %s", name, e)
        return False


def resolve_attention_backend(name: str, device: str | torch.device, kv_cache_dtype: torch.dtype | None = None) -> str:
    """Map `auto` to a concrete backend: on a GPU triton, or flashinfer for a KV cache of 1-byte floats (fp8; our
    kernels read the cache in the queries' dtype); torch on a CPU.

    triton is no slower than flashinfer on whole runs (H200, Llama-3.1-8B shapes, one call: 221 against 221
    tok/s at batch 1, 15,933 against 15,906 at 1,024 x 128/128, 2,555 against 2,563 at 32 x 1024/128;
    benchmarks/README.md) and needs no nvcc: FlashInfer without prebuilt kernels compiles its prefill kernels
    on a machine's first build (~65 s of a 121 s cold build against 58 s with triton).

    A GPU-only backend asked for on another device is a CompileError naming both, whether it is installed or not.
    """
    if name != "auto":
        if name in GPU_ONLY and torch.device(device).type != "cuda":
            raise CompileError(f"attention backend {name!r} needs a CUDA GPU, but the device is {torch.device(device)}; "
                               "use attn_backend torch (or auto) on a CPU")
        return name
    choice = "torch"
    if torch.device(device).type == "cuda":
        fp8_cache = kv_cache_dtype is not None and kv_cache_dtype.itemsize == 1
        order = ("flashinfer", "triton") if fp8_cache else ("triton", "flashinfer")
        for candidate in order:
            if (candidate != "flashinfer" or importlib.util.find_spec("flashinfer") is not None) and _usable(candidate):
                choice = candidate
                break
    logger.info("attn_backend auto -> %s (device %s)", choice, device)
    return choice
