"""Reference paged cached attention in plain torch (`auto_deploy::torch_cached_attention`), CPU and GPU."""

import math

import torch
import torch.nn.functional as F

from .descriptor import AttentionDescriptor
from .registry import AttentionRegistry


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A call to .to() that changes nothing still costs a dispatcher round trip: ~1-2 us, many times a CPU step.
    return x if x.dtype == dtype else x.to(dtype)


def _storage(cache: torch.Tensor) -> torch.Tensor:
    # Indexing kernels are missing for 1-byte float types (fp8); move their bytes as uint8 instead.
    return cache.view(torch.uint8) if cache.dtype.itemsize == 1 and cache.dtype.is_floating_point else cache


def write_paged_kv(cache: torch.Tensor, slots: torch.Tensor, new: torch.Tensor) -> None:
    """Store new [T, n_kv, d] at flat slots of a [pages, page_size, n_kv, d] cache."""
    flat = _storage(cache).view(-1, *cache.shape[2:])
    flat.index_copy_(0, slots, _storage(_cast(new, cache.dtype)))


def _gather(cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """Pages [..., P] of the cache as [..., P * page_size, n_kv, d] in the cache dtype."""
    # index_select of whole pages: 18.8 us against 60.8 for advanced indexing (cache[pages]) on 8 rows of 2 pages of
    # SmolLM2's cache on the 2-core VM (torch 2.11), twice a layer at every multi-row CPU decode step.
    g = _storage(cache).index_select(0, pages.reshape(-1)).view(cache.dtype)
    return g.reshape(*pages.shape[:-1], -1, *cache.shape[2:])


def _lone_sequence_pages(pages_row: torch.Tensor, total: int, page_size: int) -> slice | torch.Tensor:
    """The pages holding a sequence's first `total` tokens: a slice where they are consecutive (what a lone
    sequence is usually given, and then the cache is read through a view), else their ids. Reads them on the host."""
    n = -(-total // page_size)
    ids = pages_row[:n].tolist()
    return slice(ids[0], ids[0] + n) if ids == list(range(ids[0], ids[0] + n)) else pages_row[:n]


def _sequence_kv(cache: torch.Tensor, pages: slice | torch.Tensor, total: int) -> torch.Tensor:
    """One sequence's first `total` cached tokens as [1, total, n_kv, d]: a view for a slice of pages, else a gather."""
    if isinstance(pages, slice):
        return cache[pages].reshape(1, -1, *cache.shape[2:])[:, :total]
    return _gather(cache, pages)[None, :total]


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor | None,
    scale: float,
    sliding_window: int | None,
    sinks: torch.Tensor | None,
    logit_cap: float | None,
) -> torch.Tensor:
    """q [B, s, n, d] at absolute positions q_pos [B, s] over keys k/v [B, S, n_kv, d] (key j at position j;
    keys past a query's position, padding included, are masked by causality). q_pos None: a fresh causal
    prefill (q_pos = 0..s-1, S == s). Returns [B, s, n, d_v] in q's dtype."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qh = _cast(q.transpose(1, 2), acc)  # [B, n, s, d]
    kh = _cast(k.transpose(1, 2), acc)  # [B, n_kv, S, d]: GQA is grouped below, never repeated in memory
    vh = _cast(v.transpose(1, 2), acc)
    causal_only = q_pos is None and sliding_window is None
    allowed = None
    if not causal_only:
        j = torch.arange(k.shape[1], device=q.device)
        qp = (torch.arange(q.shape[1], device=q.device)[None] if q_pos is None else q_pos.to(torch.int64))[:, :, None]
        allowed = j <= qp  # [B, s, S]
        if sliding_window is not None:
            allowed = allowed & (j > qp - sliding_window)
    if sinks is None and logit_cap is None:
        # SDPA's fused CPU/GPU kernels beat the explicit softmax several times over.
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=None if allowed is None else allowed[:, None], is_causal=causal_only, scale=scale,
            enable_gqa=qh.shape[1] != kh.shape[1],
        )
        return _cast(out.transpose(1, 2), q.dtype)
    if allowed is None:
        j = torch.arange(k.shape[1], device=q.device)
        allowed = (j <= torch.arange(q.shape[1], device=q.device)[:, None])[None]
    b, n, s, d = qh.shape
    n_kv = kh.shape[1]
    qg = qh.reshape(b, n_kv, n // n_kv * s, d)  # head h uses kv head h // n_rep, like repeat_interleave
    scores = (torch.matmul(qg, kh.transpose(-2, -1)) * scale).view(b, n_kv, n // n_kv, s, -1)
    if logit_cap is not None:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    if sinks is not None:
        # gpt-oss sinks: one extra logit per head in the softmax denominator, dropped afterwards.
        sink = sinks.to(acc).reshape(1, n_kv, n // n_kv, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.reshape(b, n_kv, n // n_kv * s, -1), vh).view(b, n, s, -1)
    return _cast(out.transpose(1, 2), q.dtype)


def _attend_every_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, s, n, d] over keys k/v [B, S, n_kv, d], every key visible to every query (no mask)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qh, kh, vh = (_cast(x.transpose(1, 2), acc) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=qh.shape[1] != kh.shape[1])
    return _cast(out.transpose(1, 2), q.dtype)


def _as_cached(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """x rounded through the cache dtype, i.e. exactly what reading it back from the cache would give."""
    return x if cache.dtype == x.dtype else x.to(cache.dtype).to(x.dtype)


def _prefill_rows(q, k, v, out, seq_len_host, input_pos_host, page_table, k_cache, v_cache, num_prefill: int,
                  scale: float, window: int | None, sinks, logit_cap) -> int:
    """Prefill and chunked prefill, one sequence at a time, lengths read from host copies (no sync); returns the
    number of query tokens written."""
    page_size = k_cache.shape[1]
    offset = 0
    for i, (s, p0) in enumerate(zip(seq_len_host[:num_prefill].tolist(), input_pos_host[:num_prefill].tolist())):
        total = p0 + s
        qs = q[:, offset : offset + s]
        if p0 == 0:
            # Nothing cached before: attend over this step's own k/v, no gather from the pages.
            kc, vc = _as_cached(k[:, offset : offset + s], k_cache), _as_cached(v[:, offset : offset + s], v_cache)
            out[:, offset : offset + s] = _attend(qs, kc, vc, None, scale, window, sinks, logit_cap)
        else:
            pages = page_table[i, : -(-total // page_size)]
            kc = _gather(k_cache, pages)[None, :total]
            vc = _gather(v_cache, pages)[None, :total]
            q_pos = torch.arange(p0, total, device=q.device)[None]
            out[:, offset : offset + s] = _attend(qs, kc, vc, q_pos, scale, window, sinks, logit_cap)
        offset += s
    return offset


def _decode_rows(q, out, offset: int, num_prefill: int, num_decode: int, input_pos_host, input_pos, page_table,
                 k_cache, v_cache, scale: float, window: int | None, sinks, logit_cap) -> None:
    """Decode rows. A lone row on the CPU (batch-1 chat) reads exactly its keys, through a view where it can.
    Otherwise all sequences at once: on a GPU over the full page-table width, so shapes never depend on the data
    and the step runs without a host sync (CUDA-graph safe); unused entries (-1) are masked. On the CPU there is
    no graph to keep valid: gather only the pages the longest one uses."""
    page_size = k_cache.shape[1]
    if num_decode == 1 and q.device.type == "cpu":
        row = num_prefill
        total = int(input_pos_host[row]) + 1
        pages = _lone_sequence_pages(page_table[row], total, page_size)
        kc, vc = _sequence_kv(k_cache, pages, total), _sequence_kv(v_cache, pages, total)
        qd = q[:, offset : offset + 1]  # [1, 1, n, d]
        if window is None and sinks is None and logit_cap is None:
            # Exactly the keys the token sees, so no mask: one SDPA call on (often) views of the cache.
            out[:, offset : offset + 1] = _attend_every_key(qd, kc, vc, scale)
        else:
            pos = torch.tensor([[total - 1]])
            out[:, offset : offset + 1] = _attend(qd, kc, vc, pos, scale, window, sinks, logit_cap)
    elif num_decode > 0:
        rows = slice(num_prefill, num_prefill + num_decode)
        pages = page_table[rows]
        if q.device.type == "cpu":
            longest = int(input_pos_host[rows].max()) + 1
            pages = pages[:, : -(-longest // page_size)]
        pages = pages.clamp(min=0)
        kc, vc = _gather(k_cache, pages), _gather(v_cache, pages)  # [D, P * page_size, n_kv, d]
        pos = input_pos[rows].to(torch.int64)
        qd = q[0, offset : offset + num_decode, None]  # [D, 1, n, d]
        out[0, offset : offset + num_decode] = _attend(qd, kc, vc, pos[:, None], scale, window, sinks, logit_cap)[:, 0]


@torch.library.custom_op("auto_deploy::torch_cached_attention", mutates_args=("k_cache", "v_cache"))
def torch_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_info_host: torch.Tensor,
    seq_len_host: torch.Tensor,
    input_pos_host: torch.Tensor,
    input_pos: torch.Tensor,
    page_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor | None,
    scale: float | None,
    sliding_window: int | None,
    logit_cap: float | None,
) -> torch.Tensor:
    """Write the step's k/v into the paged cache, then attend over it: q [1, T, n, d] -> [1, T, n, d_v]."""
    t = q.shape[1]
    write_paged_kv(k_cache, slot_mapping[:t], k[0])
    write_paged_kv(v_cache, slot_mapping[:t], v[0])
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    window = sliding_window if sliding_window is not None and sliding_window > 0 else None
    num_prefill, num_prefill_tokens, num_decode = batch_info_host.tolist()
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    offset = _prefill_rows(q, k, v, out, seq_len_host, input_pos_host, page_table, k_cache, v_cache, num_prefill,
                           scale, window, sinks, logit_cap)
    assert offset == num_prefill_tokens, "batch_info_host disagrees with seq_len_host"
    _decode_rows(q, out, offset, num_prefill, num_decode, input_pos_host, input_pos, page_table, k_cache, v_cache,
                 scale, window, sinks, logit_cap)
    return out


@torch_cached_attention.register_fake
def _torch_cached_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: object) -> torch.Tensor:
    # The metadata, caches and constants never change the output's shape (fakes are called positionally).
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@AttentionRegistry.register("torch")
class TorchAttentionDescriptor(AttentionDescriptor):
    """The reference backend: plain torch, any device; slow but the ground truth for the others."""

    @classmethod
    def cached_op(cls):
        return torch.ops.auto_deploy.torch_cached_attention.default

    @classmethod
    def metadata_names(cls) -> tuple[str, ...]:
        return ("batch_info_host", "seq_len_host", "input_pos_host", "input_pos", "page_table", "slot_mapping")
