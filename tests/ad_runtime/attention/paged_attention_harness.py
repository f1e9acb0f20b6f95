"""Shared test harness: run any registered attention backend over paged steps and compare with torch_attention.

Backend tests (torch, triton, flashinfer) import `run_paged_steps` and assert on its (out, ref) pairs.
"""

import ad_compiler.custom_ops  # noqa: F401 - registers torch_attention
import torch
from ad_runtime.attention import AttentionRegistry
from ad_runtime.kv_cache.page_pool import PagePool
from ad_runtime.kv_cache.sequence_info import SequenceInfo

Step = list[tuple[int, int]]  # (sequence index, new tokens this step); prefills first


def run_paged_steps(
    backend: str,
    seq_lens: list[int],
    schedule: list[Step],
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int = 16,
    page_size: int = 4,
    num_pages: int = 64,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    sinks: bool = False,
    scale: float | None = None,
    sliding_window: int | None = None,
    logit_cap: float | None = None,
    cache_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Feed each step to the backend's cached op; returns per step (backend output, reference output)."""
    g = torch.Generator().manual_seed(seed)
    desc = AttentionRegistry.get(backend)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    qs = [rnd(1, n, n_heads, head_dim) for n in seq_lens]
    ks = [rnd(1, n, n_kv_heads, head_dim) for n in seq_lens]
    vs = [rnd(1, n, n_kv_heads, head_dim) for n in seq_lens]
    sink_t = (torch.randn(n_heads, generator=g).to(device=device, dtype=dtype)) if sinks else None
    pool = PagePool(num_pages, page_size)
    info = SequenceInfo(max_batch_size=len(seq_lens), max_seq_len=max(seq_lens), page_size=page_size,
                        max_num_tokens=sum(seq_lens), device=device)
    info.scratch_page = num_pages
    cache_shape = (num_pages + 1, page_size, n_kv_heads, head_dim)
    k_cache = torch.zeros(cache_shape, dtype=cache_dtype or dtype, device=device)
    v_cache = torch.zeros(cache_shape, dtype=cache_dtype or dtype, device=device)
    desc.on_cache_init({"k_cache": k_cache, "v_cache": v_cache})
    done = [0] * len(seq_lens)
    results = []
    for step in schedule:
        for i, n in step:
            pool.ensure_capacity(i, done[i] + n)
        info.nest_sequences([[0] * n for _, n in step], [done[i] for i, _ in step],
                            [pool.page_table(i) for i, _ in step])
        desc.host_prepare(info)
        named = info.args()
        cat = lambda ts: torch.cat([t[:, done[i] : done[i] + n] for (i, n), t in zip(step, ts)], dim=1)  # noqa: E731
        q = cat([qs[i] for i, _ in step])
        k = cat([ks[i] for i, _ in step])
        v = cat([vs[i] for i, _ in step])
        meta = [named[name] for name in desc.metadata_names()]
        prep = desc.prepare_metadata()
        prepared = list(prep.op(*[named[a] for a in prep.arg_names])) if prep is not None else []
        out = desc.cached_op()(q, k, v, *meta, *prepared, k_cache, v_cache, sink_t, scale, sliding_window, logit_cap)
        refs = []
        for i, n in step:
            end = done[i] + n
            full = torch.ops.auto_deploy.torch_attention(
                qs[i][:, :end], ks[i][:, :end], vs[i][:, :end], None, 0.0, True, scale, sink_t, sliding_window,
                logit_cap, "bsnd",
            )
            refs.append(full[:, done[i] : end])
            done[i] = end
        results.append((out, torch.cat(refs, dim=1)))
    return results
