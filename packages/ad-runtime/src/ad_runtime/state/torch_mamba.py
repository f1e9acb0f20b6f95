"""Mamba2 conv and SSM ops with per-sequence cached state, in plain torch (CPU and GPU).

Both run on the flattened batch of a step ([1, T, ...], prefills first, then one-token decodes) and keep one
state row per running sequence (`slot_idx`): a prefill starts from zeros when nothing of it is cached yet
(input_pos 0) and from its row otherwise (chunked prefill), and writes its final state back; decodes advance
all rows at once with one gather and one scatter, so the decode path has no host sync (CUDA-graph safe). A
one-token prompt travels with the decodes: its input_pos 0 masks whatever an earlier occupant left in its row.
"""

import torch
from ad_compiler.custom_ops.mamba import (causal_conv1d_with_state, conv1d_out, ssm_discretize, ssm_out, ssm_scan,
                                          ssm_step)

from .runner import STATE_METADATA, run_with_state  # noqa: F401 - STATE_METADATA re-exported


@torch.library.custom_op("auto_deploy::torch_cached_causal_conv1d", mutates_args=("conv_state",))
def torch_cached_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch_info_host: torch.Tensor,
    seq_len_host: torch.Tensor,
    input_pos_host: torch.Tensor,
    slot_idx_host: torch.Tensor,
    slot_idx: torch.Tensor,
    input_pos: torch.Tensor,
    conv_state: torch.Tensor,
) -> torch.Tensor:
    """x [1, T, c], weight [c, k]; conv_state [slots, c, k - 1] holds each sequence's last k - 1 inputs."""

    def scan(x, prev):
        return causal_conv1d_with_state(x, weight, bias, prev)

    return run_with_state(scan, [x], conv_state, conv1d_out(x), batch_info_host, seq_len_host, input_pos_host,
                          slot_idx_host, slot_idx, input_pos)


torch_cached_causal_conv1d.register_fake(conv1d_out)


@torch.library.custom_op("auto_deploy::torch_cached_ssm", mutates_args=("ssm_state",))
def torch_cached_ssm(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    batch_info_host: torch.Tensor,
    seq_len_host: torch.Tensor,
    input_pos_host: torch.Tensor,
    slot_idx_host: torch.Tensor,
    slot_idx: torch.Tensor,
    input_pos: torch.Tensor,
    ssm_state: torch.Tensor,
    chunk_size: int,
    dt_min: float,
    dt_max: float,
) -> torch.Tensor:
    """x [1, T, h, p], dt [1, T, h], B/C [1, T, g, n]; ssm_state [slots, h, p, n]. Returns y [1, T, h, p] float32."""

    def scan(x, dts, B, C, prev):
        if x.shape[1] == 1:  # decode rows, one token each (prefills always have more: one-token prompts decode)
            y, new = ssm_step(x[:, 0], dts[:, 0], A, B[:, 0], C[:, 0], D, prev)
            return y[:, None], new
        return ssm_scan(x, dts, A, B, C, D, chunk_size, prev)

    return run_with_state(scan, [x, ssm_discretize(dt, dt_bias, dt_min, dt_max), B, C], ssm_state, ssm_out(x),
                          batch_info_host, seq_len_host, input_pos_host, slot_idx_host, slot_idx, input_pos)


torch_cached_ssm.register_fake(ssm_out)
