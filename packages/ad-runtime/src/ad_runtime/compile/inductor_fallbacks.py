"""Inductor lowerings for the graph's custom ops, registered before torch.compile traces it.

Inductor lowers an op it has no lowering for through an "implicit fallback", created the first time the op is
met, and it formats a log message of that call's inputs eagerly (at any log level). An IR node prints its
inputs, which print theirs: where a fused op returns two outputs that both reach the next layer (the GEMV
prologue fusions: the GEMV's output and the residual sum), the text doubles with every layer, and the first
call of an op late in an 8B graph never finished printing. Registering the same fallback, with the same layout
constraint, before compiling skips that message and changes nothing else.
"""

import torch
from torch.fx import GraphModule

NAMESPACE = "auto_deploy"


def custom_ops(gm: GraphModule) -> list[torch._ops.OpOverload]:
    """The distinct `auto_deploy` ops `gm` calls, in graph order."""
    ops = {}
    for node in gm.graph.nodes:
        op = node.target
        if node.op == "call_function" and isinstance(op, torch._ops.OpOverload) and op.namespace == NAMESPACE:
            ops[op] = None
    return list(ops)


def register_custom_op_fallbacks(gm: GraphModule) -> list[torch._ops.OpOverload]:
    """Give every `auto_deploy` op called in `gm` without an Inductor lowering the fallback Inductor would make;
    returns the ops registered now."""
    # Imported here: torch._inductor takes ~5 s to import, paid only by builds that compile.
    from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
    from torch._library.utils import get_layout_constraint_tag

    added = []
    for op in custom_ops(gm):
        if op in lowerings:
            continue
        make_fallback(op, layout_constraint=tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True)))
        added.append(op)
    return added
