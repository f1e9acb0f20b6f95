"""Rewrite eager attention (matmul, scale, soft-cap, mask, softmax, dropout, matmul) into torch_attention."""

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ...models.factory import ModelFactory
from ...utils.graph_utils import arg, erase_dead, fake, is_op, nodes_calling
from ..attention_utils import classify_mask, insert_torch_attention, skip_noops
from ..cache_protocol import CacheInterface
from ..interface import BaseTransform, SharedConfig, TransformInfo, TransformRegistry

aten = torch.ops.aten
_CASTS = [aten.to, aten._to_copy, aten.type_as]


@dataclass
class _Logits:
    q: Node
    k: Node
    scale: float
    logit_cap: float | None


def _scalar(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _untranspose_key(kt: Any) -> Node | None:
    """k if kt is k with its last two dims swapped (transpose or permute of a 4-D tensor)."""
    kt = skip_noops(kt)
    if not isinstance(kt, Node) or fake(kt) is None or fake(kt).dim() != 4:
        return None
    if is_op(kt, aten.transpose.int) and {d % 4 for d in kt.args[1:3]} == {2, 3}:
        return kt.args[0]
    if is_op(kt, aten.permute) and [d % 4 for d in kt.args[1]] == [0, 1, 3, 2]:
        return kt.args[0]
    return None


def _scaled(node: Any, scale: float) -> tuple[Any, float]:
    """Peel `x * c` / `x / c` (and casts) off `node`, folding the constants into `scale`."""
    while True:
        node = skip_noops(node)
        if isinstance(node, Node) and is_op(node, _CASTS):
            node = node.args[0]
        elif isinstance(node, Node) and is_op(node, aten.mul.Tensor) and _scalar(node.args[1]) is not None:
            node, scale = node.args[0], scale * _scalar(node.args[1])
        elif isinstance(node, Node) and is_op(node, aten.div.Tensor) and _scalar(node.args[1]) is not None:
            node, scale = node.args[0], scale / _scalar(node.args[1])
        else:
            return node, scale


def _soft_cap(node: Any) -> tuple[Any, float] | None:
    """(x, c) if node is `c * tanh(x / c)` (Gemma 2 attn_logit_softcapping)."""
    node = skip_noops(node)
    if not (isinstance(node, Node) and is_op(node, aten.mul.Tensor) and _scalar(node.args[1]) is not None):
        return None
    cap, tanh = _scalar(node.args[1]), skip_noops(node.args[0])
    if not (isinstance(tanh, Node) and is_op(tanh, aten.tanh)):
        return None
    inner = skip_noops(tanh.args[0])
    c = _scalar(inner.args[1]) if isinstance(inner, Node) and len(inner.args) > 1 else None
    if c is None or not (
        (is_op(inner, aten.div.Tensor) and abs(c - cap) <= 1e-6 * cap)
        or (is_op(inner, aten.mul.Tensor) and abs(c * cap - 1.0) <= 1e-6)
    ):
        return None
    return inner.args[0], cap


def _parse_logits(node: Any) -> _Logits | None:
    """q, k, scale, cap from `cap * tanh(scale * (q @ k^T) / cap)` with cap and scale optional."""
    node = skip_noops(node)
    cap = None
    capped = _soft_cap(node)
    if capped is not None:
        node, cap = capped
    mm, scale = _scaled(node, 1.0)
    if not (isinstance(mm, Node) and is_op(mm, aten.matmul)):
        return None
    k = _untranspose_key(mm.args[1])
    q, scale = _scaled(mm.args[0], scale)  # some models scale q before the product
    if k is None or fake(q) is None or fake(q).dim() != 4:
        return None
    return _Logits(q, k, scale, cap)


def _probs_consumer(softmax: Node) -> Node | None:
    """The `probs @ v` matmul fed by `softmax` through casts and inference-time dropout only."""
    cur = softmax
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if is_op(user, [*_CASTS, aten.contiguous, aten.alias]) or (
            is_op(user, aten.dropout) and (arg(user, 1, "p") == 0.0 or arg(user, 2, "train") is False)
        ):
            cur = user
        elif is_op(user, aten.matmul) and user.args[0] is cur:
            return user
        else:
            return None
    return None


@TransformRegistry.register("match_eager_attention")
class MatchEagerAttention(BaseTransform):
    """Turn HF `eager_attention_forward` into one torch_attention (bnsd), soft-cap and window included.

    Before: w = matmul(q, transpose(k, 2, 3)) * s; w = c * tanh(w / c); w = w + mask
            p = softmax(w, -1, fp32).to(q.dtype); p = dropout(p, 0.0); o = matmul(p, v)
    After:  o = torch_attention(q, k, v, None, 0.0, True, s, None, window, c, "bnsd")
    The mask is dropped only when classify_mask proves it causal (window read from it); otherwise it
    is kept as an additive attn_mask with is_causal=False.
    """

    def _apply(
        self, gm: GraphModule, cm: CacheInterface | None, factory: ModelFactory | None, shared_config: SharedConfig
    ) -> tuple[GraphModule, TransformInfo]:
        num_matches = 0
        for softmax in nodes_calling(gm, [aten.softmax.int, aten._softmax]):
            if arg(softmax, 1, "dim") not in (-1, 3):
                continue
            pv = _probs_consumer(softmax)
            if pv is None or fake(pv.args[1]) is None or fake(pv.args[1]).dim() != 4:
                continue
            logits, mask = skip_noops(softmax.args[0]), None
            parsed = _parse_logits(logits)
            if parsed is None and isinstance(logits, Node) and is_op(logits, aten.add.Tensor):
                for a, b in (logits.args[:2], logits.args[1::-1]):
                    parsed, mask = _parse_logits(a), b
                    if parsed is not None:
                        break
            if parsed is None:
                continue
            is_causal, window = False, None
            if mask is not None:
                info = classify_mask(gm, mask)
                if info is not None:
                    mask, is_causal, window = None, info.is_causal, info.sliding_window
            attn = insert_torch_attention(
                gm, pv, parsed.q, parsed.k, pv.args[1], mask, 0.0, is_causal, parsed.scale,
                sliding_window=window, logit_cap=parsed.logit_cap, layout="bnsd",
            )  # fmt: skip
            pv.replace_all_uses_with(attn)
            erase_dead(gm, pv)
            num_matches += 1
        return gm, TransformInfo(num_matches=num_matches)
