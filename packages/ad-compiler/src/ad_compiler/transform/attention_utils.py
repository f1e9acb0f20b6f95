"""Node-level helpers shared by the attention matchers: repeat_kv, no-op skipping and causal-mask recognition."""

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .. import custom_ops  # noqa: F401 - registers torch.ops.auto_deploy.*
from ..utils.graph_utils import OPEN_END, arg, fake, get_attr_tensor, is_op, same_size, set_fake_val

aten = torch.ops.aten
torch_attention = torch.ops.auto_deploy.torch_attention.default

# Masked-out logits are at most this (HF uses finfo(dtype).min, older code -1e4 or -inf).
_NEG_BIG = -1e4


def is_noop_slice(node: Node) -> bool:
    """`x[:, ...]`-style slice that keeps the whole dimension."""
    if not is_op(node, aten.slice):
        return False
    start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
    return start in (None, 0) and end in (None, OPEN_END) and step == 1


def _is_same_dtype_cast(node: Node) -> bool:
    """A dtype/device conversion that changes nothing for the values (bool->bool, f32->f32)."""
    if not is_op(node, [aten.to, aten._to_copy, aten.type_as]):
        return False
    src, out = fake(node.args[0]), fake(node)
    return src is not None and out is not None and src.dtype == out.dtype


def skip_noops(node: Any) -> Any:
    """Walk up through nodes that do not change values: full slices, same-dtype casts, alias, contiguous."""
    while isinstance(node, Node) and (
        is_noop_slice(node) or _is_same_dtype_cast(node) or is_op(node, [aten.alias, aten.contiguous])
    ):
        node = node.args[0]
    return node


# ---- repeat_kv ----------------------------------------------------------------------------------


def repeat_kv_source(node: Any) -> tuple[Node, int] | None:
    """(un-repeated tensor, n_rep) if `node` is HF repeat_kv of a [b, n_kv, s, d] tensor, else None.

    Recognises the canonical form `aten.repeat_interleave(x, n_rep, dim=1)` (what match_repeat_kv
    writes) and the exported form `reshape(expand(unsqueeze(x, 2), [b, n_kv, n_rep, s, d]), [b, n_kv*n_rep, s, d])`.
    """
    node = skip_noops(node)
    if not isinstance(node, Node):
        return None
    if is_op(node, aten.repeat_interleave.self_int):
        rep, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        src = node.args[0]
        sval = fake(src)
        if isinstance(rep, int) and sval is not None and sval.dim() == 4 and dim in (1, -3):
            return src, rep
        return None
    if not is_op(node, [aten.reshape, aten.view, aten._unsafe_view]):
        return None
    expand = skip_noops(node.args[0])
    if not (isinstance(expand, Node) and is_op(expand, aten.expand)):
        return None
    unsq = skip_noops(expand.args[0])
    if not (isinstance(unsq, Node) and is_op(unsq, aten.unsqueeze) and unsq.args[1] in (2, -3)):
        return None
    src = skip_noops(unsq.args[0])  # HF's `x[:, :, None]` leaves full slices around the unsqueeze
    sval, eval_, oval = fake(src), fake(expand), fake(node)
    if sval is None or eval_ is None or oval is None or sval.dim() != 4 or eval_.dim() != 5 or oval.dim() != 4:
        return None
    b, n_kv, s, d = sval.shape
    n_rep = eval_.shape[2]
    if not isinstance(n_rep, int) or not isinstance(n_kv, int):
        return None
    for shape, expected in ((eval_.shape, (b, n_kv, n_rep, s, d)), (oval.shape, (b, n_kv * n_rep, s, d))):
        if not all(same_size(x, y) for x, y in zip(shape, expected)):
            return None
    return src, n_rep


# ---- attention masks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskInfo:
    """What a recognised mask means: causal, optionally limited to the last `sliding_window` keys."""

    is_causal: bool
    sliding_window: int | None = None


def _position_index(node: Any) -> tuple[int, Any, int] | None:
    """(axis, length, offset) if `node` is `arange(length) + offset` broadcast along one axis of a 4-D mask.

    transformers' sdpa_mask builds q_idx as [1, 1, S, 1] and kv_idx as [1, 1, 1, S] this way.
    """
    val = fake(node)
    if val is None or val.dim() != 4:
        return None
    axes = [i for i, s in enumerate(val.shape) if not (isinstance(s, int) and s == 1)]
    if len(axes) != 1:
        return None
    cur = skip_noops(node)
    while isinstance(cur, Node) and is_op(cur, aten.unsqueeze):
        cur = skip_noops(cur.args[0])
    offset = 0
    if isinstance(cur, Node) and is_op(cur, aten.add) and isinstance(cur.args[1], int):
        offset, cur = cur.args[1], skip_noops(cur.args[0])
    if not (isinstance(cur, Node) and is_op(cur, aten.arange.default) and len(cur.args) == 1):
        return None
    return axes[0], cur.args[0], offset


def _is_query_key_pair(q: Any, kv: Any) -> bool:
    """q indexes the query axis (-2), kv the key axis (-1), over the same range (no cache, top-left = bottom-right)."""
    qi, ki = _position_index(q), _position_index(kv)
    if qi is None or ki is None:
        return False
    return qi[0] == 2 and ki[0] == 3 and same_size(qi[1], ki[1]) and qi[2] == ki[2]


def _sliding_window_of(q_minus_w: Any, kv: Any) -> int | None:
    """w if the predicate is `kv > q - w`."""
    if not (isinstance(q_minus_w, Node) and is_op(q_minus_w, aten.sub) and isinstance(q_minus_w.args[1], int)):
        return None
    return q_minus_w.args[1] if _is_query_key_pair(q_minus_w.args[0], kv) else None


def _derives_from_position_ids(node: Node) -> bool:
    """True if `node` is computed from the `position_ids` input (the packed-sequence ids)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n.target == "position_ids":
            return True
        stack.extend(n.all_input_nodes)
    return False


def _is_packed_sequence_term(node: Node) -> bool:
    """`seq_id[b, q_idx] == seq_id[b, kv_idx]` with seq_id from position_ids (transformers' packed-sequence mask)."""
    if not is_op(node, aten.eq.Tensor):
        return False
    a, b = (skip_noops(x) for x in node.args[:2])
    if not all(isinstance(x, Node) and is_op(x, aten.index.Tensor) for x in (a, b)):
        return False
    if a.args[0] is not b.args[0] or not _derives_from_position_ids(a.args[0]):
        return False
    ia, ib = a.args[1], b.args[1]
    return len(ia) == 2 and len(ib) == 2 and ia[0] is ib[0] and _is_query_key_pair(ia[1], ib[1])


def _conjuncts(node: Any) -> list[Any]:
    """Leaves of a tree of boolean ANDs."""
    node = skip_noops(node)
    if isinstance(node, Node) and is_op(node, [aten.__and__, aten.bitwise_and, aten.logical_and]):
        return _conjuncts(node.args[0]) + _conjuncts(node.args[1])
    return [node]


def _is_true(node: Any) -> bool:
    """`q_idx.new_ones((), dtype=bool)`: the neutral element and_masks starts from."""
    if not (isinstance(node, Node) and is_op(node, aten.new_ones)):
        return False
    val = fake(node)
    return val is not None and val.dtype == torch.bool and val.numel() == 1


def _is_zero_constant(gm: GraphModule, node: Any) -> bool:
    """A scalar 0 or a constant one-element tensor holding 0 (HF's `torch.tensor(0.0)`)."""
    if isinstance(node, (int, float)):
        return node == 0
    while isinstance(node, Node) and is_op(node, [aten.lift_fresh_copy, aten.detach, aten.detach_, aten.clone]):
        node = node.args[0]
    if not (isinstance(node, Node) and node.op == "get_attr"):
        return False
    t = get_attr_tensor(gm, node.target)
    return isinstance(t, torch.Tensor) and t.numel() == 1 and t.item() == 0


def _boolean_mask(gm: GraphModule, mask: Any) -> Any:
    """The boolean mask behind an additive float mask `where(allowed, 0, -big)`; bool masks pass through."""
    mask = skip_noops(mask)
    while isinstance(mask, Node) and is_op(mask, aten.expand):  # broadcasting does not change the pattern
        mask = skip_noops(mask.args[0])
    val = fake(mask)
    if val is not None and val.dtype == torch.bool:
        return mask
    if isinstance(mask, Node) and is_op(mask, aten.where):
        cond, keep, drop = mask.args[:3]
        if _is_zero_constant(gm, keep) and isinstance(drop, (int, float)) and drop <= _NEG_BIG:
            return _boolean_mask(gm, cond)
    return None


def classify_mask(gm: GraphModule, mask: Any) -> MaskInfo | None:
    """MaskInfo if `mask` is provably transformers' (sliding-window) causal mask, else None.

    How we decide: the mask (bool, or float `where(m, 0, min)`) must be an AND of terms that are each
    one of: the constant True; `kv_idx <= q_idx` (causal); `kv_idx > q_idx - w` (sliding window);
    `seq_id[b, q_idx] == seq_id[b, kv_idx]` with seq_id computed from position_ids. q_idx / kv_idx
    must be the same `arange(S) + c` on the query / key axis, so query and key ranges coincide.
    The packed-sequence term is dropped on purpose: it is all-true whenever each row's positions
    are consecutive, and at run time sequence boundaries come from the cache metadata instead.
    Any other term (padding, chunked, bidirectional, ...) keeps the explicit mask.
    """
    bool_mask = _boolean_mask(gm, mask)
    if bool_mask is None:
        return None
    causal, window = False, None
    for term in _conjuncts(bool_mask):
        if _is_true(term) or (isinstance(term, Node) and _is_packed_sequence_term(term)):
            continue
        if isinstance(term, Node) and is_op(term, [aten.le.Tensor, aten.ge.Tensor]):
            kv, q = term.args[:2] if is_op(term, aten.le.Tensor) else term.args[1::-1]
            if _is_query_key_pair(q, kv):
                causal = True
                continue
            return None
        if isinstance(term, Node) and is_op(term, [aten.gt.Tensor, aten.lt.Tensor]):
            kv, q_minus_w = term.args[:2] if is_op(term, aten.gt.Tensor) else term.args[1::-1]
            w = _sliding_window_of(q_minus_w, kv)
            if w is None or (window is not None and w != window):
                return None
            window = w
            continue
        return None
    return MaskInfo(is_causal=True, sliding_window=window) if causal else None


def insert_torch_attention(
    gm: GraphModule,
    before: Node,
    q: Node,
    k: Node,
    v: Node,
    attn_mask: Node | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    sinks: Node | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    layout: str = "bnsd",
) -> Node:
    """A torch_attention call (all arguments explicit) placed before `before`, with fake meta filled in."""
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(
            torch_attention,
            (q, k, v, attn_mask, dropout_p, is_causal, scale, sinks, sliding_window, logit_cap, layout),
        )
    node.meta.update({k_: v_ for k_, v_ in before.meta.items() if k_ in ("nn_module_stack", "stack_trace")})
    set_fake_val(node)
    return node


ATTN_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "sinks", "sliding_window",
             "logit_cap", "layout")  # fmt: skip
_DEFAULTS = dict(attn_mask=None, dropout_p=0.0, is_causal=True, scale=None, sinks=None, sliding_window=None,
                 logit_cap=None, layout="bnsd")  # fmt: skip


def attention_args(node: Node) -> dict[str, Any]:
    """Every argument of a torch_attention call by name, defaults filled in."""
    return {name: arg(node, i, name, _DEFAULTS.get(name)) for i, name in enumerate(ATTN_ARGS)}


def with_attention_args(node: Node, **updates: Any) -> None:
    """Rewrite a torch_attention call's arguments (positional, all explicit)."""
    args = attention_args(node) | updates
    node.args = tuple(args[name] for name in ATTN_ARGS)
    node.kwargs = {}

