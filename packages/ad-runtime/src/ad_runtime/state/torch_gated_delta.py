"""Gated delta rule with per-sequence cached state, in plain torch (CPU and GPU).

Same step layout and state-row rules as the Mamba ops (`torch_mamba.py`): prefills run one by one from
zeros (input_pos 0) or from their row (chunked prefill) and write the final state back; decodes advance
every row at once with one gather and one scatter, without a host sync.
"""

import torch
from ad_compiler.custom_ops.gated_delta import gated_delta_scan

from .torch_mamba import _prefills, _started


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
    out = q.new_empty(*v.shape)
    prefills, num_prefill, num_decode = _prefills(batch_info_host, seq_len_host, input_pos_host, slot_idx_host)
    for offset, s, p0, slot in prefills:
        sl = slice(offset, offset + s)
        prev = delta_state[slot : slot + 1] if p0 > 0 else None
        y, final = gated_delta_scan(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], prev, use_qk_l2norm)
        out[:, sl] = y.to(out.dtype)
        delta_state[slot] = final[0].to(delta_state.dtype)
    if num_decode > 0:
        offset = prefills[-1][0] + prefills[-1][1] if prefills else 0
        sl = slice(offset, offset + num_decode)
        rows = slot_idx[num_prefill : num_prefill + num_decode]
        prev = _started(delta_state.index_select(0, rows), input_pos[num_prefill : num_prefill + num_decode])
        # Each decode row is a batch entry of one token: [D, 1, h, ...].
        y, new = gated_delta_scan(q[0, sl, None], k[0, sl, None], v[0, sl, None], g[0, sl, None],
                                  beta[0, sl, None], prev, use_qk_l2norm)
        out[0, sl] = y[:, 0].to(out.dtype)
        delta_state.index_copy_(0, rows, new.to(delta_state.dtype))
    return out


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
