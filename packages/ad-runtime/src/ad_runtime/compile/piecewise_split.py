"""Splitting the cached graph for piecewise CUDA graphs: the pieces between its cache ops, and which dim of each
value crossing a piece boundary counts tokens (found by running two probe steps)."""

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.passes.split_module import split_module

# Inputs that carry one entry per token: pieces that read them are captured (the inputs are copied in, padded).
TOKEN_INPUTS = frozenset({"input_ids", "position_ids"})
_SIZE_OPS = frozenset({torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int,
                       torch.ops.aten.sym_storage_offset.default})
STATIC = "static"  # a value whose shape (or int value) does not change with the step
VARIES = "varies"  # changes with something else than the token count (e.g. the number of sequences)
TOKEN_INT = "token-int"  # an int equal to the step's token count


def _is_size_node(node: Node) -> bool:
    """An int-valued node (sizes and arithmetic on them): computed afresh every step, never baked into a graph."""
    if node.target is operator.getitem:  # a tuple item stays with its producer
        return False
    if node.target in _SIZE_OPS or getattr(node.target, "__module__", None) in ("_operator", "math"):
        return True
    return isinstance(node.meta.get("val"), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def eager_nodes(gm: GraphModule) -> set[Node]:
    """Nodes that must run outside CUDA graphs: readers of step metadata or caches (attention, state ops, the
    logits gather), submodule calls (export's guard function), size arithmetic, and tuple items of these."""
    step_inputs = {n for n in gm.graph.nodes if n.op == "placeholder" and n.name not in TOKEN_INPUTS}
    eager: set[Node] = set()
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if (n.op == "call_module" or _is_size_node(n) or any(a in step_inputs for a in n.all_input_nodes)
                or (n.target is operator.getitem and n.args[0] in eager)):
            eager.add(n)
    return eager


def _items_after_producers(gm: GraphModule) -> None:
    """Move every tuple item right behind its producer: a piece boundary between them would hand the tuple itself
    across (no buffer holds a tuple), e.g. where a transform inserted a step-input reader between two items."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    moved = False
    for producer in list(gm.graph.nodes):
        anchor = producer
        for item in sorted((u for u in producer.users if u.target is operator.getitem), key=order.__getitem__):
            moved |= anchor.next is not item
            anchor.append(item)
            anchor = item
    if moved:
        gm.recompile()  # the graph's code follows its new order (the module also runs as the eager fallback)


def split_at_eager_nodes(gm: GraphModule) -> tuple[GraphModule, set[str]]:
    """The graph as a chain of submodules (`submod_i`), alternating captured and eager runs of nodes; returns it
    and the names of the eager submodules."""
    _items_after_producers(gm)
    eager = eager_nodes(gm)
    part: dict[Node, int] = {}
    current, last = -1, None
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        if (n in eager) != last:
            current, last = current + 1, n in eager
        part[n] = current
    eager_parts = {p for n, p in part.items() if n in eager}
    split = split_module(gm, None, lambda n: part[n], keep_original_order=True)
    return split, {f"submod_{p}" for p in eager_parts}


@dataclass
class ValueShapes:
    """Per top-level value of the split graph, what the probes saw: STATIC, VARIES, TOKEN_INT or the token dim."""

    kinds: dict[str, Any] = field(default_factory=dict)

    def token_dim(self, name: str) -> int | None:
        k = self.kinds.get(name, STATIC)
        return k if isinstance(k, int) and not isinstance(k, bool) else None

    def capturable(self, name: str) -> bool:
        return self.kinds.get(name, STATIC) != VARIES


def _size(v: Any) -> Any:
    """What a probe keeps of a value: a tensor's shape, an int, or a marker for anything else."""
    if isinstance(v, torch.Tensor):
        return v.shape
    return int(v) if isinstance(v, (int, torch.SymInt)) else type(v).__name__


def flat_values(value: Any) -> list[Any]:
    """A piece's outputs as a list (a piece returns one value or a tuple)."""
    return list(value) if isinstance(value, (tuple, list)) else [value]


def classify(a: Any, b: Any, tokens_a: int, tokens_b: int) -> Any:
    """What changed between probe A (tokens_a tokens) and probe B (tokens_b) for one value: shapes (torch.Size)
    or ints as the probes saw them."""
    if a == b:
        # Lists and other objects cannot wait in a buffer between eager code and a graph.
        return STATIC if isinstance(a, (torch.Size, int)) or a == "NoneType" else VARIES
    if isinstance(a, torch.Size) and isinstance(b, torch.Size) and len(a) == len(b):
        diff = [d for d in range(len(a)) if a[d] != b[d]]
        if len(diff) == 1 and a[diff[0]] == tokens_a and b[diff[0]] == tokens_b:
            return diff[0]
    elif isinstance(a, int) and isinstance(b, int) and (a, b) == (tokens_a, tokens_b):
        return TOKEN_INT
    return VARIES


PROBE_TOKENS = (6, 9)  # token counts of the two probe steps: the graph's steps must hold 9 tokens


def probe_shapes(run_step: Callable[[list[int]], dict[str, Any]], max_batch_size: int) -> ValueShapes:
    """Classify every top-level value of the split graph from two dummy steps (one sequence of 6 tokens; two of 4
    and 5, or one of 9 where a step holds one sequence): `run_step(lengths)` runs the graph eagerly on such a step
    and returns every value it computed, by name."""
    seen = [{k: [_size(v) for v in flat_values(x)] for k, x in run_step(lengths).items()}
            for lengths in ([6], [4, 5] if max_batch_size > 1 else [9])]
    shapes = ValueShapes()
    for name, a in seen[0].items():
        kinds = [classify(x, y, *PROBE_TOKENS) for x, y in zip(a, seen[1][name])]
        shapes.kinds[name] = kinds[0] if len(kinds) == 1 else (VARIES if VARIES in kinds else STATIC)
    return shapes
