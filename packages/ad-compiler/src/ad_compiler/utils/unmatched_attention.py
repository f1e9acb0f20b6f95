"""Find attention the pattern matchers did not claim: a softmax over scores from a product of two activations.

A model whose attention is not a canonical `torch_attention` node would run without a KV cache: the
first token of a request comes out right and every later one is wrong. Routers (softmax over a linear of
the hidden states) and MoE expert products (one side is weights) are not attention and are not reported.
"""

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

_SOFTMAX = {aten._softmax.default, aten.softmax.int, aten._safe_softmax.default}
# Products whose operands decide what they are: attention scores multiply two activations.
_PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.baddbmm.default, aten.einsum.default}
# Stop walking back at these: a linear is a projection (one side weights), never attention scores.
_OPAQUE = {aten.linear.default, aten.addmm.default}
_MAX_DEPTH = 12  # scores reach the softmax through a handful of scale/cap/mask/cat ops, not more


def _constant_derived(node: Node, memo: dict[Node, bool]) -> bool:
    """True if `node` is computed from parameters and buffers alone (no graph input upstream)."""
    stack = [node]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        if n.op == "get_attr":
            memo[n] = True
            stack.pop()
            continue
        if n.op != "call_function":
            memo[n] = False
            stack.pop()
            continue
        inputs = n.all_input_nodes
        pending = [i for i in inputs if i not in memo]
        if pending:
            stack.extend(pending)
            continue
        memo[n] = bool(inputs) and all(memo[i] for i in inputs)
        stack.pop()
    return memo[node]


def _scores_product(softmax: Node, memo: dict[Node, bool]) -> Node | None:
    """The activation x activation product feeding `softmax` within a few ops, if there is one."""
    frontier, seen = [(softmax.args[0], 0)], set()
    while frontier:
        n, depth = frontier.pop()
        if not isinstance(n, Node) or n in seen or depth > _MAX_DEPTH:
            continue
        seen.add(n)
        if n.op != "call_function" or n.target in _OPAQUE:
            continue
        if n.target in _PRODUCTS:
            operands = [a for a in n.all_input_nodes]
            if len(operands) >= 2 and not any(_constant_derived(a, memo) for a in operands):
                return n
            continue
        frontier.extend((a, depth + 1) for a in n.all_input_nodes)
    return None


def find_unmatched_attention(gm: GraphModule) -> list[tuple[Node, Node]]:
    """(softmax, scores product) pairs that look like attention left in plain aten ops."""
    memo: dict[Node, bool] = {}
    found = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _SOFTMAX:
            product = _scores_product(n, memo)
            if product is not None:
                found.append((n, product))
    return found
