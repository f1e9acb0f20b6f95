"""Random paged batches and a plain torch reference for paged attention (test helper)."""

import math
from dataclasses import dataclass

import torch


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, n_heads, d]
    k: torch.Tensor  # [T, n_kv, d] new keys of the step
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_pages, page_size, n_kv, d], context already stored
    v_cache: torch.Tensor
    seq_len: torch.Tensor  # int32 [B]
    input_pos: torch.Tensor  # int32 [B]
    cu_seqlen: torch.Tensor  # int32 [B+1]
    page_table: torch.Tensor  # int32 [B, max_pages], -1 padded
    ctx_k: list[torch.Tensor]  # per sequence [ctx, n_kv, d]: what the cache holds before the step
    ctx_v: list[torch.Tensor]


def make_paged_batch(
    seq_lens: list[int],
    ctx_lens: list[int],
    n_heads: int,
    n_kv: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    spare_pages: int = 3,
) -> PagedBatch:
    """Sequences get shuffled (non-contiguous) pages; unused cache slots hold noise that must never be read."""
    g = torch.Generator().manual_seed(seed)
    num_seq = len(seq_lens)
    pages_per_seq = [math.ceil((s + c) / page_size) for s, c in zip(seq_lens, ctx_lens)]
    num_pages = sum(pages_per_seq) + spare_pages
    perm = torch.randperm(num_pages, generator=g)
    max_pages = max(pages_per_seq) + 1
    page_table = torch.full((num_seq, max_pages), -1, dtype=torch.int32)
    k_cache = torch.randn(num_pages, page_size, n_kv, head_dim, generator=g) * 10
    v_cache = torch.randn(num_pages, page_size, n_kv, head_dim, generator=g) * 10
    ctx_k, ctx_v, used = [], [], 0
    for b, (n_pages, c) in enumerate(zip(pages_per_seq, ctx_lens)):
        page_table[b, :n_pages] = perm[used : used + n_pages].to(torch.int32)
        used += n_pages
        ck = torch.randn(c, n_kv, head_dim, generator=g)
        cv = torch.randn(c, n_kv, head_dim, generator=g)
        for p in range(c):
            k_cache[page_table[b, p // page_size], p % page_size] = ck[p]
            v_cache[page_table[b, p // page_size], p % page_size] = cv[p]
        ctx_k.append(ck.to(dtype))
        ctx_v.append(cv.to(dtype))
    total = sum(seq_lens)
    q = torch.randn(total, n_heads, head_dim, generator=g)
    k = torch.randn(total, n_kv, head_dim, generator=g)
    v = torch.randn(total, n_kv, head_dim, generator=g)
    seq_len = torch.tensor(seq_lens, dtype=torch.int32)
    cu = torch.zeros(num_seq + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(seq_len, 0)
    dev = torch.device(device)
    return PagedBatch(
        q=q.to(dev, dtype), k=k.to(dev, dtype), v=v.to(dev, dtype),
        k_cache=k_cache.to(dev, dtype), v_cache=v_cache.to(dev, dtype),
        seq_len=seq_len.to(dev), input_pos=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
        cu_seqlen=cu.to(dev), page_table=page_table.to(dev),
        ctx_k=[t.to(dev) for t in ctx_k], ctx_v=[t.to(dev) for t in ctx_v],
    )


def reference_attention(
    batch: PagedBatch,
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense fp32 attention per sequence over (context ++ new keys), causal by absolute position."""
    head_dim = batch.q.shape[-1]
    group = batch.q.shape[1] // batch.k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    outs = []
    cu = batch.cu_seqlen.tolist()
    for b in range(len(cu) - 1):
        q = batch.q[cu[b] : cu[b + 1]].float()
        keys = torch.cat([batch.ctx_k[b], batch.k[cu[b] : cu[b + 1]]]).float().repeat_interleave(group, 1)
        vals = torch.cat([batch.ctx_v[b], batch.v[cu[b] : cu[b + 1]]]).float().repeat_interleave(group, 1)
        ctx = batch.ctx_k[b].shape[0]
        s = torch.einsum("qhd,khd->hqk", q, keys) * scale
        if logit_cap:
            s = logit_cap * torch.tanh(s / logit_cap)
        qpos = torch.arange(q.shape[0], device=q.device)[:, None] + ctx
        kpos = torch.arange(keys.shape[0], device=q.device)[None, :]
        visible = kpos <= qpos
        if sliding_window:
            visible &= kpos > qpos - sliding_window
        s = s.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            sink_col = sinks.float()[:, None, None].expand(-1, q.shape[0], 1)
            p = torch.softmax(torch.cat([s, sink_col], -1), -1)[..., :-1]
        else:
            p = torch.softmax(s, -1)
        outs.append(torch.einsum("hqk,khd->qhd", p, vals))
    return torch.cat(outs).to(batch.q.dtype)


def cache_contents(batch: PagedBatch, b: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions [0, length) of sequence b, read back from the paged cache."""
    ps = batch.k_cache.shape[1]
    pos = torch.arange(length, device=batch.k_cache.device)
    pages = batch.page_table[b, pos // ps].long()
    return batch.k_cache[pages, pos % ps], batch.v_cache[pages, pos % ps]
