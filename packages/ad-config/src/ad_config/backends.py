"""Which backend choices need a CUDA GPU, so a configuration for a CPU can be refused before any build."""

import os
from typing import TYPE_CHECKING, Any

from .error_format import format_field_problems
from .errors import ConfigError
from .merge import Path
from .origins import OriginMap

if TYPE_CHECKING:
    from .llm_args import AutoDeployConfig  # imports this module: only for the annotations

# Transform -> {backend: what to use instead on a CPU}. Triton kernels run on a CPU only in Triton's
# interpreter (TRITON_INTERPRET=1, slow, used by the tests); without it they fail late in the build
# ("0 active drivers"). FlashInfer and CUDA graphs have no CPU path at all.
_USE_TORCH = "use 'torch' or 'auto' on a CPU"
_USE_CPU_COMPILE = "use 'torch-simple', 'torch-compile' or 'auto' on a CPU"
GPU_ONLY_BACKENDS: dict[str, dict[str, str]] = {
    "insert_cached_attention": {"flashinfer": _USE_TORCH, "triton": _USE_TORCH},
    "fuse_rmsnorm": {"triton": _USE_TORCH},
    "fuse_add_rmsnorm": {"triton": _USE_TORCH},
    "optimize_rope": {"triton": _USE_TORCH},
    "compile_model": {"torch-cudagraph": _USE_CPU_COMPILE, "torch-opt": _USE_CPU_COMPILE},
}


def gpu_only_problems(args: "AutoDeployConfig", device: str) -> list[tuple[Path, str, Any]]:
    """(key path, reason, value) for each enabled transform whose backend needs a CUDA GPU.

    `args` is an AutoDeployConfig (or LlmArgs); `device` says what the target is, for the message
    ("device 'cpu'", "the CPU (device 'auto', no CUDA GPU visible)").
    """
    problems: list[tuple[Path, str, Any]] = []
    for name, choices in GPU_ONLY_BACKENDS.items():
        cfg = (getattr(args, "transforms", None) or {}).get(name)
        if cfg is None or not getattr(cfg, "enabled", True):
            continue
        backend = getattr(cfg, "backend", None)
        if backend not in choices or (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
            continue
        reason = f"backend {backend!r} needs a CUDA GPU, but the target is {device}; {choices[backend]}"
        problems.append((("transforms", name, "backend"), reason, backend))
    return problems


def refuse_gpu_only_backends(
    args: "AutoDeployConfig", device: str, origins: OriginMap | None = None, prefix: Path = ()
) -> None:
    """Raise ConfigError naming each GPU-only backend of `args` (target `device`, phrased as for
    `gpu_only_problems`), with the value's origin; `prefix` is where `args` sits (('args',) in an experiment)."""
    problems = gpu_only_problems(args, device)
    if problems:
        if origins is None:
            origins = getattr(args, "origin_map", None) or OriginMap()
        raise ConfigError(format_field_problems(problems, origins, prefix))
