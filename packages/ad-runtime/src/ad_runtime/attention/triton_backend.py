"""The "triton" attention backend: our paged Triton kernels (context/chunked prefill and split-K decode)."""

import torch

from ad_runtime.kernels.triton import paged_attention as _pa
from ad_runtime.kernels.triton import paged_decode as _pd
from ad_runtime.kernels.triton import paged_kv_write as _kv

from .descriptor import AttentionDescriptor
from .registry import AttentionRegistry


def _rows(x: torch.Tensor) -> torch.Tensor:
    # Kernels index rows and heads by stride but need the head dim contiguous.
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("auto_deploy::triton_cached_attention", mutates_args=("k_cache", "v_cache"))
def triton_cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_info_host: torch.Tensor,
    seq_len_host: torch.Tensor,
    seq_len: torch.Tensor,
    input_pos: torch.Tensor,
    cu_seqlen: torch.Tensor,
    page_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor | None,
    scale: float | None,
    sliding_window: int | None,
    logit_cap: float | None,
) -> torch.Tensor:
    """Write the step's k/v into the paged cache, then attend: q [1, T, n, d] -> [1, T, n, d]."""
    if v.shape[-1] != q.shape[-1]:
        raise ValueError("the triton attention backend needs the value head dim equal to the query head dim")
    t = q.shape[1]
    _kv.write_paged_kv(_rows(k[0]), _rows(v[0]), k_cache, v_cache, slot_mapping[:t])
    num_prefill, num_prefill_tokens, num_decode = batch_info_host.tolist()
    q3 = _rows(q[0])
    out = q.new_empty(q.shape)
    window = sliding_window if sliding_window is not None and sliding_window > 0 else None
    opts = {"scale": scale, "sliding_window": window, "logit_cap": logit_cap, "sinks": sinks}
    if num_prefill > 0:
        # The longest chunk sizes the grid; read from the host copy so the GPU is not synchronised.
        max_q_len = int(seq_len_host[:num_prefill].max())
        _pa.context_attention(
            q3[:num_prefill_tokens], k_cache, v_cache, cu_seqlen[: num_prefill + 1], input_pos[:num_prefill],
            page_table[:num_prefill], max_q_len=max_q_len, out=out[0, :num_prefill_tokens], **opts,
        )
    if num_decode > 0:
        rows = slice(num_prefill, num_prefill + num_decode)
        toks = slice(num_prefill_tokens, num_prefill_tokens + num_decode)
        _pd.decode_attention(
            q3[toks], k_cache, v_cache, seq_len[rows], input_pos[rows], page_table[rows], out=out[0, toks], **opts,
        )
    return out


@triton_cached_attention.register_fake
def _triton_cached_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_info_host: torch.Tensor,
    seq_len_host: torch.Tensor,
    seq_len: torch.Tensor,
    input_pos: torch.Tensor,
    cu_seqlen: torch.Tensor,
    page_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor | None,
    scale: float | None,
    sliding_window: int | None,
    logit_cap: float | None,
) -> torch.Tensor:
    return q.new_empty(q.shape)


@AttentionRegistry.register("triton")
class TritonAttentionDescriptor(AttentionDescriptor):
    """Paged Triton kernels on the GPU (or the Triton interpreter on a CPU, for tests)."""

    @classmethod
    def cached_op(cls):
        return torch.ops.auto_deploy.triton_cached_attention.default

    @classmethod
    def metadata_names(cls) -> tuple[str, ...]:
        return ("batch_info_host", "seq_len_host", "seq_len", "input_pos", "cu_seqlen", "page_table", "slot_mapping")
