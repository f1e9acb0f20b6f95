"""The "triton" attention backend: our paged Triton kernels (context/chunked prefill and split-K decode)."""

import torch

from ad_runtime.kernels.triton import paged_attention as _pa
from ad_runtime.kernels.triton import paged_decode as _pd
from ad_runtime.kernels.triton import paged_kv_write as _kv
from ad_runtime.kernels.triton import rope_kv_write as _rope_kv

from .descriptor import AttentionDescriptor
from .registry import AttentionRegistry


# H200, Llama-3.1-8B shapes (benchmarks/README.md, seventeenth and eighteenth sessions): RoPE inside the decode
# kernel took a batch-32 decode step from 5.81 to 5.70 ms and a SmolLM2 batch-1 step from 0.586 to 0.604 ms.
ROPE_IN_DECODE_MIN_ROWS = 8


def _rows(x: torch.Tensor) -> torch.Tensor:
    # Kernels index rows and heads by stride but need the head dim contiguous.
    return x if x.stride(-1) == 1 else x.contiguous()


def _write_step_kv(q, k, v, k_cache, v_cache, slot_mapping, rope_cos_sin, rope_position_ids,
                   rope_in_decode: bool) -> torch.Tensor:
    """Write the step's keys and values into the cache (rotated with q where RoPE is fused in; not yet where the
    decode kernel rotates and writes them itself) and return the queries as [T, n, d] for the kernels."""
    t = q.shape[1]
    if rope_cos_sin is None:
        _kv.write_paged_kv(_rows(k[0]), _rows(v[0]), k_cache, v_cache, slot_mapping[:t])
        return _rows(q[0])
    if rope_in_decode:
        return _rows(q[0])
    return _rope_kv.rope_and_write_paged_kv(
        _rows(q[0]), _rows(k[0]), _rows(v[0]), k_cache, v_cache, slot_mapping[:t], rope_position_ids[0, :t],
        _rows(rope_cos_sin),
    )


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
    rope_cos_sin: torch.Tensor | None = None,
    rope_position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write the step's k/v into the paged cache, then attend: q [1, T, n, d] -> [1, T, n, d].

    With rope_cos_sin ([max_pos, d] = [cos | sin]) and rope_position_ids ([1, T]), q and k arrive before RoPE
    (fuse_rope_into_attention) and are rotated in the same launch that writes the cache.
    """
    if v.shape[-1] != q.shape[-1]:
        raise ValueError("the triton attention backend needs the value head dim equal to the query head dim")
    num_prefill, num_prefill_tokens, num_decode = batch_info_host.tolist()
    # A decode-only step of many rows with RoPE fused in: the decode kernel rotates q and k and writes the new k/v
    # itself, one launch a layer fewer. Few rows keep the separate launch: there the rotation's dependent loads
    # (position, then cos/sin, then the partner half) before every split's first key tile cost more than a launch.
    rope_in_decode = rope_cos_sin is not None and num_prefill == 0 and num_decode >= ROPE_IN_DECODE_MIN_ROWS
    q3 = _write_step_kv(q, k, v, k_cache, v_cache, slot_mapping, rope_cos_sin, rope_position_ids, rope_in_decode)
    out = q3.new_empty((1, *q3.shape), dtype=q3.dtype if rope_cos_sin is None else torch.result_type(q, rope_cos_sin))
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
        rope = None
        if rope_in_decode:
            rope = _pd.NewKeysWithRope(_rows(k[0])[toks], _rows(v[0])[toks], slot_mapping[toks],
                                       rope_position_ids[0, toks], _rows(rope_cos_sin))
        _pd.decode_attention(
            q3[toks], k_cache, v_cache, seq_len[rows], input_pos[rows], page_table[rows], out=out[0, toks],
            rope=rope, **opts,
        )
    return out


@triton_cached_attention.register_fake
def _triton_cached_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: object,
                                  **kwargs: object) -> torch.Tensor:
    # Only q and, with RoPE fused in, the cos/sin table (14th after v) decide the output.
    rope_cos_sin = rest[13] if len(rest) > 13 else kwargs.get("rope_cos_sin")
    dtype = q.dtype if rope_cos_sin is None else torch.result_type(q, rope_cos_sin)
    return q.new_empty(q.shape, dtype=dtype)


@AttentionRegistry.register("triton")
class TritonAttentionDescriptor(AttentionDescriptor):
    """Paged Triton kernels on the GPU (or the Triton interpreter on a CPU, for tests)."""

    @classmethod
    def cached_op(cls):
        return torch.ops.auto_deploy.triton_cached_attention.default

    @classmethod
    def metadata_names(cls) -> tuple[str, ...]:
        return ("batch_info_host", "seq_len_host", "seq_len", "input_pos", "cu_seqlen", "page_table", "slot_mapping")
