"""Linear-attention ops with per-sequence cached state, in plain torch (CPU and GPU): the gated delta rule
(Qwen3-Next, Qwen3.5) and decayed linear attention (MiniMax lightning attention).

Same step layout and state-row rules as the Mamba ops (`torch_mamba.py`): prefills run one by one from
zeros (input_pos 0) or from their row (chunked prefill) and write the final state back; decodes advance
every row at once with one gather and one scatter, without a host sync.
"""

from collections.abc import Callable

import torch
from ad_compiler.custom_ops.gated_delta import gated_delta_scan
from ad_compiler.custom_ops.linear_attention import linear_attention_scan

from .torch_mamba import _prefills, _started

# scan(per-token tensors [b, s, ...]..., state [b, ...] or None) -> (out [b, s, h, dv] float32, final state)
Scan = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def run_with_state(scan: Scan, tokens: list[torch.Tensor], state: torch.Tensor, out: torch.Tensor,
                   batch_info_host: torch.Tensor, seq_len_host: torch.Tensor, input_pos_host: torch.Tensor,
                   slot_idx_host: torch.Tensor, slot_idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Fill `out` [1, T, ...] from per-token inputs [1, T, ...], reading and writing each sequence's state row."""
    prefills, num_prefill, num_decode = _prefills(batch_info_host, seq_len_host, input_pos_host, slot_idx_host)
    for offset, s, p0, slot in prefills:
        sl = slice(offset, offset + s)
        prev = state[slot : slot + 1] if p0 > 0 else None
        y, final = scan(*(t[:, sl] for t in tokens), prev)
        out[:, sl] = y.to(out.dtype)
        state[slot] = final[0].to(state.dtype)
    if num_decode > 0:
        offset = prefills[-1][0] + prefills[-1][1] if prefills else 0
        sl = slice(offset, offset + num_decode)
        rows = slot_idx[num_prefill : num_prefill + num_decode]
        prev = _started(state.index_select(0, rows), input_pos[num_prefill : num_prefill + num_decode])
        y, new = scan(*(t[0, sl, None] for t in tokens), prev)  # each decode row: a batch entry of one token
        out[0, sl] = y[:, 0].to(out.dtype)
        state.index_copy_(0, rows, new.to(state.dtype))
    return out


@torch.library.custom_op("auto_deploy::torch_cached_gated_delta_rule", mutates_args=("delta_state",))
def torch_cached_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    batch_info_host: torch.Tensor,
    seq_len_host: torch.Tensor,
    input_pos_host: torch.Tensor,
    slot_idx_host: torch.Tensor,
    slot_idx: torch.Tensor,
    input_pos: torch.Tensor,
    delta_state: torch.Tensor,
    use_qk_l2norm: bool,
) -> torch.Tensor:
    """q/k [1, T, h, dk], v [1, T, h, dv], g/beta [1, T, h]; delta_state [slots, h, dk, dv] float32."""
    def scan(q, k, v, g, beta, prev):
        return gated_delta_scan(q, k, v, g, beta, prev, use_qk_l2norm)

    return run_with_state(scan, [q, k, v, g, beta], delta_state, q.new_empty(*v.shape), batch_info_host,
                          seq_len_host, input_pos_host, slot_idx_host, slot_idx, input_pos)


@torch_cached_gated_delta_rule.register_fake
def _torch_cached_gated_delta_rule_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    batch_info_host: torch.Tensor,
    seq_len_host: torch.Tensor,
    input_pos_host: torch.Tensor,
    slot_idx_host: torch.Tensor,
    slot_idx: torch.Tensor,
    input_pos: torch.Tensor,
    delta_state: torch.Tensor,
    use_qk_l2norm: bool,
) -> torch.Tensor:
    return q.new_empty(*v.shape)


@torch.library.custom_op("auto_deploy::torch_cached_linear_attention", mutates_args=("linear_state",))
def torch_cached_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    batch_info_host: torch.Tensor,
    seq_len_host: torch.Tensor,
    input_pos_host: torch.Tensor,
    slot_idx_host: torch.Tensor,
    slot_idx: torch.Tensor,
    input_pos: torch.Tensor,
    linear_state: torch.Tensor,
) -> torch.Tensor:
    """q/k [1, T, h, dk], v [1, T, h, dv], g [1, T, h]; linear_state [slots, h, dk, dv] float32."""
    return run_with_state(linear_attention_scan, [q, k, v, g], linear_state, q.new_empty(*v.shape),
                          batch_info_host, seq_len_host, input_pos_host, slot_idx_host, slot_idx, input_pos)


@torch_cached_linear_attention.register_fake
def _torch_cached_linear_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    batch_info_host: torch.Tensor,
    seq_len_host: torch.Tensor,
    input_pos_host: torch.Tensor,
    slot_idx_host: torch.Tensor,
    slot_idx: torch.Tensor,
    input_pos: torch.Tensor,
    linear_state: torch.Tensor,
) -> torch.Tensor:
    return q.new_empty(*v.shape)
