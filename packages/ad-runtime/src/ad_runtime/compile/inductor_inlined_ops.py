"""Custom ops whose torch bodies Inductor compiles through instead of calling them as opaque fallbacks.

An `auto_deploy` op without an Inductor lowering stays a call into Python in the compiled code: on a CPU each
torch RMSNorm, add+RMSNorm and RoPE op of the bundled SmolLM2 then ran its ~8-15 aten calls one by one, ~120
such calls a decode step that Inductor could have fused into a few C++ loops. These ops are pure tensor functions
(no mutation, no host reads), so their bodies serve as decompositions: AOTAutograd traces them into aten ops and
Inductor fuses those like the rest of the graph. Ops with host reads or cache writes (attention, state updates)
stay fallbacks.
"""

from collections.abc import Callable

import torch
from torch.fx import GraphModule

from .direct_calls import python_impl
from .inductor_fallbacks import custom_ops

INLINED = (
    "torch_rmsnorm_fused",
    "torch_fused_add_rmsnorm",
    "torch_rope_with_explicit_cos_sin",
    "torch_rope_with_cos_sin_cache",
    "torch_cos_sin_table_lookup",
)


def inlined_op_bodies(gm: GraphModule) -> dict[torch._ops.OpOverload, Callable]:
    """The INLINED ops `gm` calls, each mapped to its Python body (the function its custom_op was made from); an op
    with a device-specific kernel keeps it (no entry)."""
    bodies = {op: python_impl(op) for op in custom_ops(gm) if op._opname in INLINED}
    return {op: fn for op, fn in bodies.items() if fn is not None}
