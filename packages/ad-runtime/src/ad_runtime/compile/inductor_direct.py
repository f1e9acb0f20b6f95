"""Inductor on the cached graph itself, without Dynamo: one compile for (nearly) every step shape, cached on disk.

The graph is already an FX graph of aten and custom ops, so Dynamo's bytecode tracing only rebuilt what we had:
on an H200 it took 9-12 s of a warm 8B build (caches hit) and ~10 s of a cold one (and its guard check showed
~0.5 ms in a profiled prefill step, though the engine's time to a first token did not move without it). Here the inputs become fake tensors with one symbol per varying
dimension (caches keep their static shapes) and `compile_fx` lowers the graph; AOTAutograd's and Inductor's
on-disk caches key on that graph, so a second process with the same graph loads the compiled code in well
under a second. The shape assumptions the compile made are kept as a guard expression and checked on each
call: a step outside them compiles a variant, as Dynamo would recompile.

One-token steps: tracing assumes the token count is not 1 (aten's contiguity checks), so the first one-token step
of a cold build compiles a second variant, which AOTAutograd's cache then serves with the first one's code; a warm
build loads the first compile without that guard and runs one-token steps through it as well. Both give the same
greedy tokens as the eager graph (tests/ad_runtime/transform/test_compile_model.py, on the CPU and on the GPU).
"""

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
import torch.nn as nn
from torch.fx import GraphModule

from .inductor_fallbacks import register_custom_op_fallbacks
from .inductor_inlined_ops import inlined_op_bodies

logger = logging.getLogger(__name__)

MAX_VARIANTS = 8  # as Dynamo's recompile limit: more shape classes than this means something is wrong


class _Variant:
    """One compiled graph and the shape guards under which it is valid (None: valid for every shape)."""

    def __init__(self, fn: Callable[..., Any], guards: str | None):
        self.fn = fn
        self.guard_source = guards
        self._code = compile(guards, "<inductor shape guards>", "eval") if guards else None
        # sympy's names, which the expression may call (imported here: a module import would pull sympy into
        # `import ad_runtime`; per call it would cost every eager step)
        from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

        self._globals = SYMPY_INTERP

    def admits(self, inputs: list[Any]) -> bool:
        if self._code is None:
            return True
        # the expression ShapeEnv.produce_guards_expression wrote, over sizes, strides and offsets of t0, t1, ...
        return bool(eval(self._code, self._globals, {"L": {f"t{i}": a for i, a in enumerate(inputs)}}))  # noqa: S307


class InductorCompiled(nn.Module):
    """Calls the graph's Inductor compile (made at the first call) with the graph's keyword arguments."""

    def __init__(self, model: GraphModule, static_inputs: Iterable[str] = ()):
        super().__init__()
        self.model = model
        register_custom_op_fallbacks(model)
        self.inlined = inlined_op_bodies(model)  # ops Inductor compiles through (the graph never changes)
        self.names = [n.target for n in model.graph.nodes if n.op == "placeholder"]
        self.static_inputs = set(static_inputs)  # inputs whose shape never changes (the KV caches)
        self.variants: list[_Variant] = []
        self.num_compiles = 0  # observability: tests and benchmarks check how often the graph was compiled

    def forward(self, **kwargs: Any) -> Any:
        inputs = [kwargs[n] for n in self.names]
        for variant in self.variants:
            if variant.admits(inputs):
                return variant.fn(*inputs)
        if len(self.variants) >= MAX_VARIANTS:
            raise RuntimeError(f"the graph was compiled for {MAX_VARIANTS} shape classes and this step fits none "
                               f"(input shapes {[tuple(a.shape) for a in inputs if isinstance(a, torch.Tensor)]})")
        variant = self._compile(inputs)
        self.variants.append(variant)
        return variant.fn(*inputs)

    def _compile(self, inputs: list[Any]) -> _Variant:
        from torch._guards import TracingContext, tracing
        from torch._inductor.compile_fx import compile_fx
        from torch._inductor.decomposition import select_decomp_table
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

        # No duck sizing (equal sizes stay separate symbols: a decode step's token and row counts are equal, a
        # prefill's are not) and no 0/1 specialisation (a one-row step is a step like any other); sizes are
        # reasoned about size-obliviously, so the compile holds for 1 as for many.
        env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
        mode = FakeTensorMode(shape_env=env)

        def fake(name: str, a: Any) -> Any:
            if not isinstance(a, torch.Tensor):
                return a
            kind = DimDynamic.STATIC if name in self.static_inputs else DimDynamic.DYNAMIC
            return mode.from_tensor(a, symbolic_context=StatelessSymbolicContext(dynamic_sizes=[kind] * a.dim()))

        fakes = [fake(n, a) for n, a in zip(self.names, inputs)]
        # A plain copy of the graph: compile_fx may rewrite the graph it gets, and the exported module carries
        # forward hooks (closures) that its cache keys could not pickle.
        plain = GraphModule(self.model, copy.deepcopy(self.model.graph))
        # Only where there is an op to inline: a table of our own makes AOTAutograd bypass its on-disk cache, which
        # a warm 8B build on a GPU (Triton ops, nothing to inline) relies on.
        decompositions = {**select_decomp_table(), **self.inlined} if self.inlined else None
        with fx_config.patch(backed_size_oblivious=True), torch.no_grad(), tracing(TracingContext(mode)):
            fn = compile_fx(plain, fakes, decompositions=decompositions)
        guards = env.produce_guards_expression(fakes, ignore_static=True)
        self.num_compiles += 1
        logger.info("inductor compile %d of the graph%s", self.num_compiles,
                    f" (shape guards: {guards[:200]})" if guards else " (valid for every step shape)")
        return _Variant(fn, guards)
