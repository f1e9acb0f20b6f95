"""Compile backends: each turns the cached graph into the callable the executor runs every step."""

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx.experimental._config  # noqa: F401 - patched around compiled calls
import torch.nn as nn
from torch.fx import GraphModule
from ad_compiler.errors import CompileError
from ad_compiler.registry import Registry

from ..kv_cache.interface import CachedSequenceInterface
from .direct_calls import call_custom_ops_directly
from .inductor_direct import InductorCompiled
from .inductor_fallbacks import register_custom_op_fallbacks

if TYPE_CHECKING:
    from ad_config import LlmArgs

logger = logging.getLogger(__name__)

# (model, cm, cuda_graph_batch_sizes, piecewise_num_tokens) -> the module to call as `mod(**cm.named_args)`.
Compiler = Callable[[nn.Module, CachedSequenceInterface, list[int] | None, list[int] | None], nn.Module]


# Compile backends by name (registered below and in cuda_graph.py).
CompileBackendRegistry: Registry[Compiler] = Registry("compile backend")


def resolve_compile_backend(name: str, device: str | torch.device, quiet: bool = False) -> str:
    """`auto`: torch-opt on a GPU, torch-simple on a CPU (logged unless `quiet`: said once, when compiling)."""
    if name != "auto":
        return name
    choice = "torch-opt" if torch.device(device).type == "cuda" else "torch-simple"
    if not quiet:
        logger.info("compile_backend auto -> %s (device %s)", choice, device)
    return choice


def compile_backend_of(args: "LlmArgs", device: str | torch.device) -> str | None:
    """The backend compile_model will use for `args` on `device` (auto resolved, quietly); None without it."""
    cfg = args.transforms.get("compile_model")
    return resolve_compile_backend(cfg.backend, device, quiet=True) if cfg is not None and cfg.enabled else None


def default_cuda_graph_batch_sizes(cm: CachedSequenceInterface) -> list[int]:
    """1, 2, 4, 8, 16, then steps of 16 up to 128, 32 up to 256, 64 up to 512...: a decode batch pads by 15 rows or
    ~25% at most (powers of two padded 129 rows to 256, and those rows cost as much as real ones once the GEMMs
    are compute-bound), plus max_batch_size itself."""
    limit = min(cm.info.max_batch_size, cm.info.max_num_tokens)
    sizes, s = [1, 2, 4, 8, 16], 16
    while s < limit:
        s += max(16, 1 << (s.bit_length() - 3))
        sizes.append(s)
    return sorted({b for b in sizes if b <= limit} | {limit})


@CompileBackendRegistry.register("torch-simple")
def compile_simple(model: nn.Module, cm: CachedSequenceInterface, batch_sizes: list[int] | None,
                   piecewise: list[int] | None = None) -> nn.Module:
    """Eager: the graph as it is; on a CPU its Python custom ops are called as plain functions (no dispatcher)."""
    if cm.device.type == "cpu" and isinstance(model, GraphModule):
        n = call_custom_ops_directly(model)
        logger.debug("torch-simple: %d custom-op calls made direct", n)
    return model


class ShapeGeneralCompiled(nn.Module):
    """torch.compile (Dynamo, then Inductor) of the model traced once for every step shape: the way in before
    InductorCompiled, kept for an A/B of whole runs (AUTODEPLOY_DYNAMO_COMPILE=1) and for non-graph modules.

    dynamic=True alone still compiled an 8B model three times (~30 s each on an H200): once more when a step's
    token count first differed from its sequence count (duck sizing had made the two sizes one symbol, since
    decode steps have equal ones), and once more for a batch of one row (0/1 specialisation). Tracing without
    duck sizing and with size-oblivious sizes gives one graph for decode and prefill, one row or many.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        if isinstance(model, GraphModule):
            register_custom_op_fallbacks(model)
        self.compiled = torch.compile(model, dynamic=True)

    def forward(self, **kwargs: torch.Tensor) -> Any:
        # The settings are read while tracing (the first call, or a recompile), so they hold around every call.
        with torch.fx.experimental._config.patch(use_duck_shape=False, backed_size_oblivious=True):
            return self.compiled(**kwargs)


@CompileBackendRegistry.register("torch-compile")
def compile_torch(model: nn.Module, cm: CachedSequenceInterface, batch_sizes: list[int] | None,
                  piecewise: list[int] | None = None) -> nn.Module:
    """Inductor straight on the graph (InductorCompiled); Dynamo's torch.compile for a module that is no graph."""
    if not isinstance(model, GraphModule) or os.environ.get("AUTODEPLOY_DYNAMO_COMPILE") == "1":
        return ShapeGeneralCompiled(model)
    return InductorCompiled(model, static_inputs=cm.caches)


def _with_graphs(model: nn.Module, step_model: nn.Module, cm: CachedSequenceInterface, batch_sizes: list[int] | None,
                 piecewise: list[int] | None) -> nn.Module:
    """CUDA graphs around `step_model`: whole graphs of decode steps, and piecewise graphs of the graph `model` for
    prefill and mixed steps up to a token bucket (`piecewise`: None for the default sizes, [] for none)."""
    from .cuda_graph import CudaGraphModel
    from .piecewise import PiecewiseGraphs, default_piecewise_num_tokens

    sizes = default_piecewise_num_tokens(cm) if piecewise is None else piecewise
    if sizes and isinstance(model, GraphModule):
        step_model = PiecewiseGraphs(model, cm, sizes, fallback=step_model)
    return CudaGraphModel(step_model, cm, batch_sizes or default_cuda_graph_batch_sizes(cm))


@CompileBackendRegistry.register("torch-cudagraph")
def compile_cudagraph(model: nn.Module, cm: CachedSequenceInterface, batch_sizes: list[int] | None,
                      piecewise: list[int] | None = None) -> nn.Module:
    return _with_graphs(model, model, cm, batch_sizes, piecewise)


@CompileBackendRegistry.register("torch-opt")
def compile_opt(model: nn.Module, cm: CachedSequenceInterface, batch_sizes: list[int] | None,
                piecewise: list[int] | None = None) -> nn.Module:
    return _with_graphs(model, compile_torch(model, cm, None), cm, batch_sizes, piecewise)


def compile_model(
    model: nn.Module, cm: CachedSequenceInterface, backend: str = "auto", cuda_graph_batch_sizes: list[int] | None = None,
    piecewise_num_tokens: list[int] | None = None,
) -> nn.Module:
    """Compile `model` with the named backend (resolving `auto` for cm's device)."""
    name = resolve_compile_backend(backend, cm.device)
    if name in ("torch-cudagraph", "torch-opt") and cm.device.type != "cuda":
        raise CompileError(f"compile backend {name!r} needs a CUDA device (got {cm.device}); use torch-simple "
                           "or torch-compile on a CPU")
    return CompileBackendRegistry.get(name)(model, cm, cuda_graph_batch_sizes, piecewise_num_tokens)
