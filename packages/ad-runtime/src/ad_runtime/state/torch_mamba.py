"""Mamba2 conv and SSM ops with per-sequence cached state, in plain torch (CPU and GPU).

Both run on the flattened batch of a step ([1, T, ...], prefills first, then one-token decodes) and keep one
state row per running sequence (`slot_idx`): a prefill starts from zeros when nothing of it is cached yet
(input_pos 0) and from its row otherwise (chunked prefill), and writes its final state back; decodes advance
all rows at once with one gather and one scatter, so the decode path has no host sync (CUDA-graph safe). A
one-token prompt travels with the decodes: its input_pos 0 masks whatever an earlier occupant left in its row.
"""

import torch
from ad_compiler.custom_ops.mamba import causal_conv1d_with_state, ssm_discretize, ssm_scan, ssm_step

# The metadata both ops take, right after their tensor inputs (see METADATA_NAMES in attention/descriptor.py).
STATE_METADATA = ("batch_info_host", "seq_len_host", "input_pos_host", "slot_idx_host", "slot_idx", "input_pos")


def _prefills(batch_info_host: torch.Tensor, seq_len_host: torch.Tensor, input_pos_host: torch.Tensor,
              slot_idx_host: torch.Tensor) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """([(token offset, length, input_pos, slot) per prefill], num_prefill, num_decode) from host copies."""
    num_prefill, _, num_decode = batch_info_host.tolist()
    out, offset = [], 0
    for s, p0, slot in zip(seq_len_host[:num_prefill].tolist(), input_pos_host[:num_prefill].tolist(),
                           slot_idx_host[:num_prefill].tolist()):
        out.append((offset, s, p0, slot))
        offset += s
    return out, num_prefill, num_decode


def _started(state: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Rows of gathered state, zeroed where the sequence has nothing cached yet (input_pos 0)."""
    keep = (input_pos > 0).to(state.dtype).view(-1, *([1] * (state.dim() - 1)))
    return state * keep


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
    out = torch.empty_like(x)
    prefills, num_prefill, num_decode = _prefills(batch_info_host, seq_len_host, input_pos_host, slot_idx_host)
    for offset, s, p0, slot in prefills:
        prev = conv_state[slot : slot + 1] if p0 > 0 else None
        y, new = causal_conv1d_with_state(x[:, offset : offset + s], weight, bias, prev)
        out[:, offset : offset + s] = y
        conv_state[slot] = new[0].to(conv_state.dtype)
    if num_decode > 0:
        offset = prefills[-1][0] + prefills[-1][1] if prefills else 0
        rows = slot_idx[num_prefill : num_prefill + num_decode]
        xd = x[0, offset : offset + num_decode].to(weight.dtype)  # [D, c]
        prev = _started(conv_state.index_select(0, rows), input_pos[num_prefill : num_prefill + num_decode])
        window = torch.cat([prev.to(weight.dtype), xd[:, :, None]], dim=-1)  # [D, c, k]
        y = (window * weight).sum(-1)
        if bias is not None:
            y = y + bias
        out[0, offset : offset + num_decode] = y.to(x.dtype)
        conv_state.index_copy_(0, rows, window[:, :, 1:].to(conv_state.dtype))
    return out


@torch_cached_causal_conv1d.register_fake
def _torch_cached_causal_conv1d_fake(
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
    return torch.empty_like(x)


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
    out = x.new_empty(x.shape, dtype=torch.float32)
    dts = ssm_discretize(dt, dt_bias, dt_min, dt_max)
    prefills, num_prefill, num_decode = _prefills(batch_info_host, seq_len_host, input_pos_host, slot_idx_host)
    for offset, s, p0, slot in prefills:
        sl = slice(offset, offset + s)
        prev = ssm_state[slot : slot + 1] if p0 > 0 else None
        y, final = ssm_scan(x[:, sl], dts[:, sl], A, B[:, sl], C[:, sl], D, chunk_size, prev)
        out[:, sl] = y
        ssm_state[slot] = final[0].to(ssm_state.dtype)
    if num_decode > 0:
        offset = prefills[-1][0] + prefills[-1][1] if prefills else 0
        sl = slice(offset, offset + num_decode)
        rows = slot_idx[num_prefill : num_prefill + num_decode]
        prev = _started(ssm_state.index_select(0, rows), input_pos[num_prefill : num_prefill + num_decode])
        y, new = ssm_step(x[0, sl], dts[0, sl], A, B[0, sl], C[0, sl], D, prev)
        out[0, sl] = y
        ssm_state.index_copy_(0, rows, new.to(ssm_state.dtype))
    return out


@torch_cached_ssm.register_fake
def _torch_cached_ssm_fake(
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
    return x.new_empty(x.shape, dtype=torch.float32)
