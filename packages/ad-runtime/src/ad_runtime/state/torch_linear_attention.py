"""Linear-attention ops with per-sequence cached state, in plain torch (CPU and GPU): the gated delta rule
(Qwen3-Next, Qwen3.5) and decayed linear attention (MiniMax lightning attention).

Step layout and state rows as for the Mamba ops (`runner.run_with_state`).
"""

import torch
from ad_compiler.custom_ops.gated_delta import gated_delta_scan
from ad_compiler.custom_ops.linear_attention import linear_attention_scan

from .runner import run_with_state


def _out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: object) -> torch.Tensor:
    """An empty output [1, T, h, dv] in q's dtype; also both ops' fake, as no other argument changes it."""
    return q.new_empty(*v.shape)


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

    return run_with_state(scan, [q, k, v, g, beta], delta_state, _out(q, k, v), batch_info_host, seq_len_host,
                          input_pos_host, slot_idx_host, slot_idx, input_pos)


torch_cached_gated_delta_rule.register_fake(_out)


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
    return run_with_state(linear_attention_scan, [q, k, v, g], linear_state, _out(q, k, v), batch_info_host,
                          seq_len_host, input_pos_host, slot_idx_host, slot_idx, input_pos)


torch_cached_linear_attention.register_fake(_out)
