"""Match RoPE subgraphs (rotate-half, DeepSeek interleaved, complex) and replace them by torch_rope_* ops."""

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ... import custom_ops  # noqa: F401 - registers torch.ops.auto_deploy.*
from ...models.factory import ModelFactory
from ...utils.graph_utils import (
    OPEN_END,
    arg,
    eliminate_dead_code,
    is_last_dim,
    is_op,
    operands,
    set_fake_val,
    slice_args,
    static_shape,
    unsqueezed,
    val,
)
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten


# ---- the three RoPE patterns ----------------------------------------------------------------------


@dataclass
class RopeMatch:
    """One rotated tensor: `out` computes rope(x) with `tables` (cos, sin or freqs_cis) unsqueezed at `dim`."""

    out: Node
    x: Node
    tables: tuple[Node, ...]
    dim: int
    op: Any


def _rotate_half_of(cat: Node) -> Node | None:
    """x for `cat([-x[..., h:], x[..., :h]], -1)` with h = x.shape[-1] / 2 (HF rotate_half)."""
    if not is_op(cat, aten.cat) or len(cat.args[0]) != 2:
        return None
    neg, lo = cat.args[0]
    if not is_op(neg, aten.neg) or not is_last_dim(arg(cat, 1, "dim", 0), cat):
        return None
    hi_s, lo_s = slice_args(neg.args[0]), slice_args(lo)
    if hi_s is None or lo_s is None or hi_s[0] is not lo_s[0]:
        return None
    x = lo_s[0]
    shape = static_shape(x)
    d = shape[-1]
    if d is None or d % 2 or hi_s[1] != len(shape) - 1 or lo_s[1] != len(shape) - 1:
        return None
    if lo_s[2:] != (0, d // 2, 1) or hi_s[2] != d // 2 or hi_s[3] < d or hi_s[4] != 1:
        return None
    return x


def _table_ok(table: Node, x: Node, last: int) -> bool:
    """cos/sin must be [b, s, last] and x 4-D: the canonical op's contract."""
    ts, xs = static_shape(table), static_shape(x)
    return ts is not None and xs is not None and len(ts) == 3 and len(xs) == 4 and ts[-1] == last


def match_rotate_half(add: Node) -> RopeMatch | None:
    """`x * cos.unsqueeze(d) + rotate_half(x) * sin.unsqueeze(d)` (any operand order)."""
    terms = operands(add, aten.add)
    if terms is None:
        return None
    for m_cos, m_sin in (terms, terms[::-1]):
        ops_sin = operands(m_sin, aten.mul)
        ops_cos = operands(m_cos, aten.mul)
        if ops_sin is None or ops_cos is None:
            continue
        for rh, s_u in (ops_sin, ops_sin[::-1]):
            x = _rotate_half_of(rh)
            if x is None or x not in ops_cos:
                continue
            c_u = ops_cos[1] if ops_cos[0] is x else ops_cos[0]
            cu, su = unsqueezed(c_u), unsqueezed(s_u)
            if cu is None or su is None or cu[1] != su[1] or c_u is x:
                continue
            shape = static_shape(x)
            if not (_table_ok(cu[0], x, shape[-1]) and _table_ok(su[0], x, shape[-1])):
                continue
            return RopeMatch(add, x, (cu[0], su[0]), cu[1], torch.ops.auto_deploy.torch_rope_with_explicit_cos_sin.default)
    return None


def _half_table(node: Node, d: int) -> tuple[Node, int] | None:
    """(table, dim) for `table[..., :d/2].unsqueeze(dim)` with table [b, s, d]."""
    u = unsqueezed(node)
    if u is None:
        return None
    s = slice_args(u[0])
    if s is None or s[1] != 2 or s[2:] != (0, d // 2, 1) or static_shape(s[0]) is None:
        return None
    if static_shape(s[0])[-1] != d:
        return None
    return s[0], u[1]


def match_interleaved(cat: Node) -> RopeMatch | None:
    """DeepSeek `cat([x1*c - x2*s, x2*c + x1*s], -1)` with x1/x2 = even/odd of x, c/s = cos/sin[..., :d/2]."""
    if not is_op(cat, aten.cat) or len(cat.args[0]) != 2 or not is_last_dim(arg(cat, 1, "dim", 0), cat):
        return None
    first, second = operands(cat.args[0][0], aten.sub), operands(cat.args[0][1], aten.add)
    if first is None or second is None:
        return None
    prods = [operands(n, aten.mul) for n in (*first, *second)]
    if any(p is None for p in prods):
        return None
    x1, x2 = None, None
    for cand in prods[0]:
        s = slice_args(cand)
        if s is not None and s[2:] == (0, OPEN_END, 2) and s[1] == len(static_shape(s[0])) - 1:
            x1 = cand
    if x1 is None:
        return None
    x = slice_args(x1)[0]
    d = static_shape(x)[-1]
    for cand in prods[1]:
        s = slice_args(cand)
        if s is not None and s[0] is x and s[1:] == (len(static_shape(x)) - 1, 1, OPEN_END, 2):
            x2 = cand
    if x2 is None or d is None or d % 2:
        return None

    def other(p: tuple[Node, Node], known: Node) -> Node | None:
        return p[1] if p[0] is known else p[0] if p[1] is known else None

    # x1*c - x2*s, x2*c + x1*s
    c1, s1, c2, s2 = other(prods[0], x1), other(prods[1], x2), other(prods[2], x2), other(prods[3], x1)
    if None in (c1, s1, c2, s2) or c1 is not c2 or s1 is not s2:
        return None
    ct, st = _half_table(c1, d), _half_table(s1, d)
    if ct is None or st is None or ct[1] != st[1] or not (_table_ok(ct[0], x, d) and _table_ok(st[0], x, d)):
        return None
    return RopeMatch(cat, x, (ct[0], st[0]), ct[1], torch.ops.auto_deploy.torch_rope_with_qk_interleaving.default)


def _is_cast(node: Node, dtype: torch.dtype | None = None) -> bool:
    if not is_op(node, (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as)):
        return False
    v = val(node)
    return dtype is None or (isinstance(v, torch.Tensor) and v.dtype == dtype)


def match_complex(vr: Node) -> RopeMatch | None:
    """Llama-4 `view_as_real(view_as_complex(x.float().reshape(..., -1, 2)) * f[:, :, None, :]).flatten(3).type_as(x)`."""
    if not is_op(vr, aten.view_as_real) or len(vr.users) != 1:
        return None
    prod = operands(vr.args[0], aten.mul)
    if prod is None:
        return None
    for xc, fu in (prod, prod[::-1]):
        if not is_op(xc, aten.view_as_complex):
            continue
        pairs = xc.args[0]
        if not is_op(pairs, (aten.view, aten.reshape, aten._unsafe_view)):
            continue
        xf = pairs.args[0]
        x = xf.args[0] if _is_cast(xf, torch.float32) else xf
        f = unsqueezed(fu)
        xs, ps = static_shape(x), static_shape(pairs)
        if f is None or xs is None or ps is None or len(xs) != 4 or ps[-1] != 2 or xs[-1] is None:
            continue
        fs, fv = static_shape(f[0]), val(f[0])
        if fs is None or len(fs) != 3 or fs[-1] != xs[-1] // 2 or not fv.dtype.is_complex:
            continue
        flat = next(iter(vr.users))
        if not is_op(flat, (aten.view, aten.reshape, aten._unsafe_view, aten.flatten)):
            continue
        if static_shape(flat) != xs:
            continue
        # The op returns x's dtype (type_as); the graph's cast back, if any, is the node to replace.
        users = list(flat.users)
        if len(users) == 1 and _is_cast(users[0], val(x).dtype):
            out = users[0]
        elif val(x).dtype == torch.float32:
            out = flat
        else:
            continue
        return RopeMatch(out, x, (f[0],), f[1], torch.ops.auto_deploy.torch_rope_with_complex_freqs.default)
    return None


MATCHERS: tuple[Callable[[Node], RopeMatch | None], ...] = (match_rotate_half, match_interleaved, match_complex)


# ---- rewriting ---------------------------------------------------------------------------------


def _placement(gm: GraphModule, ms: list[RopeMatch], order: dict[Node, int]) -> Node | None:
    """A node before which one op computing all of `ms` can go, or None if none keeps the graph topological."""
    inputs = [m.x for m in ms] + list(ms[0].tables)
    first_out = min((m.out for m in ms), key=order.__getitem__)
    if all(order[i] < order[first_out] for i in inputs):
        return first_out
    last_in = max(inputs, key=order.__getitem__)
    users = [u for m in ms for u in m.out.users]
    if all(order[u] > order[last_in] for u in users):
        return last_in.next
    return None


def _rewrite(gm: GraphModule, ms: list[RopeMatch], before: Node) -> None:
    """Insert op(x_q, x_k, *tables, dim) before `before` and route each match's users to its output."""
    xq, xk = ms[0].x, ms[-1].x
    with gm.graph.inserting_before(before):
        rope = gm.graph.call_function(ms[0].op, (xq, xk, *ms[0].tables, ms[0].dim))
        set_fake_val(rope)
        outs = []
        for i in range(len(ms)):
            o = gm.graph.call_function(operator.getitem, (rope, i))
            if isinstance(val(rope), (tuple, list)):
                o.meta["val"] = val(rope)[i]
            outs.append(o)
    for m, o in zip(ms, outs):
        m.out.replace_all_uses_with(o)


@TransformRegistry.register("match_rope_pattern")
class MatchRopePattern(BaseTransform):
    """Replace RoPE subgraphs by one canonical op per (q, k) pair.

    Before:  q_out = q * cos.unsqueeze(1) + cat(-q[..., d/2:], q[..., :d/2]) * sin.unsqueeze(1);  k_out = (same, k)
    After:   r = torch_rope_with_explicit_cos_sin(q, k, cos, sin, 1);  q_out = r[0];  k_out = r[1]
    Likewise DeepSeek's even/odd form -> torch_rope_with_qk_interleaving and Llama-4's complex
    form -> torch_rope_with_complex_freqs. Partial rotary (Phi-3: rope on `q[..., :r]`, then cat with
    the rest) matches on the rotated slice only, so the pass-through part is untouched. Rotations
    sharing cos/sin are paired in graph order (q, then k); an unpaired one becomes op(x, x, ...)[0].
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        matches: list[RopeMatch] = []
        for node in gm.graph.nodes:
            for matcher in MATCHERS:
                m = matcher(node)
                if m is not None:
                    matches.append(m)
                    break
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        groups: dict[tuple, list[RopeMatch]] = {}
        for m in matches:
            groups.setdefault((m.op, m.tables, m.dim), []).append(m)
        num = 0
        for group in groups.values():
            group.sort(key=lambda m: order[m.out])
            while group:
                pair, group = group[:2], group[2:]
                before = _placement(gm, pair, order) if len(pair) == 2 else None
                if before is None:
                    # Cannot be computed by one node here: rotate each alone (x passed as q and k).
                    for m in pair:
                        _rewrite(gm, [m], m.out)
                        num += 1
                else:
                    _rewrite(gm, pair, before)
                    num += 1
        eliminate_dead_code(gm)
        return gm, TransformInfo(num_matches=num)
