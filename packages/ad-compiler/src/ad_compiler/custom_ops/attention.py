"""Canonical attention op `auto_deploy::torch_attention`: GQA, two layouts, causal, sliding window, sinks, soft-cap."""

import math

import torch
import torch.nn.functional as F

_LAYOUTS = ("bnsd", "bsnd")


def _allowed_mask(
    s_q: int, s_k: int, is_causal: bool, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean [s_q, s_k] mask of visible keys, or None when every key is visible.

    Queries are aligned to the end of the keys (bottom-right), so query i sits at absolute position
    i + s_k - s_q; with s_q == s_k this is the usual "j <= i" and "i - w < j".
    """
    if not is_causal and sliding_window is None:
        return None
    q_pos = torch.arange(s_q, device=device)[:, None] + (s_k - s_q)
    k_pos = torch.arange(s_k, device=device)[None, :]
    allowed = torch.ones(s_q, s_k, dtype=torch.bool, device=device)
    if is_causal:
        allowed &= k_pos <= q_pos
    if sliding_window is not None:
        allowed &= k_pos > q_pos - sliding_window
    return allowed


def _attention_bnsd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
    is_causal: bool, scale: float, sinks: torch.Tensor | None, sliding_window: int | None, logit_cap: float | None,
) -> torch.Tensor:
    s_q, s_k = q.shape[-2], k.shape[-2]
    plain = sinks is None and logit_cap is None and sliding_window is None
    # SDPA's is_causal is top-left aligned and cannot be combined with a mask; only use it where it means ours.
    if plain and (not is_causal or (attn_mask is None and s_q == s_k)):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=True
        )

    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    # Softmax in fp32 at least: soft-capping and sinks are sensitive to low-precision logits.
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
    if logit_cap is not None:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    allowed = _allowed_mask(s_q, s_k, is_causal, sliding_window, q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(acc)
    if sinks is not None:
        # gpt-oss: one extra logit per head joins the softmax denominator and is then dropped.
        sink = sinks.to(acc).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
        scores = scores - scores.amax(dim=-1, keepdim=True)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v.to(acc)).to(q.dtype)


@torch.library.custom_op("auto_deploy::torch_attention", mutates_args=())
def torch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = True,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    layout: str = "bnsd",
) -> torch.Tensor:
    """Scaled dot-product attention; output has the query's layout and the value's head dim."""
    if layout not in _LAYOUTS:
        raise ValueError(f"torch_attention: layout must be one of {_LAYOUTS}, got {layout!r}")
    if layout == "bsnd":
        query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    if query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"torch_attention: {query.shape[1]} query heads not a multiple of {key.shape[1]} kv heads")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if sliding_window is not None and sliding_window <= 0:
        sliding_window = None
    out = _attention_bnsd(query, key, value, attn_mask, dropout_p, is_causal, scale, sinks, sliding_window, logit_cap)
    if layout == "bsnd":
        out = out.transpose(1, 2)
    return out.contiguous()


@torch_attention.register_fake
def _torch_attention_fake(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *_: object) -> torch.Tensor:
    # The options after value never change the output's shape, and the dispatcher has checked them already.
    return query.new_empty((*query.shape[:-1], value.shape[-1]))
