"""Step layout shared by every op with per-sequence state: which rows are prefills, and one runner for scans.

A step's flattened batch holds prefills first (one by one, from their host lengths), then one-token decodes.
"""

from collections.abc import Callable

import torch

# The metadata every state op takes, right after its tensor inputs (see METADATA_NAMES in attention/descriptor.py).
STATE_METADATA = ("batch_info_host", "seq_len_host", "input_pos_host", "slot_idx_host", "slot_idx", "input_pos")

# scan(per-token tensors [b, s, ...]..., state [b, ...] or None) -> (out [b, s, ...], final state [b, ...])
Scan = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def prefill_rows(batch_info_host: torch.Tensor, seq_len_host: torch.Tensor, input_pos_host: torch.Tensor,
              slot_idx_host: torch.Tensor) -> tuple[list[tuple[int, int, int, int]], int, int]:
    """([(token offset, length, input_pos, slot) per prefill], num_prefill, num_decode) from host copies."""
    num_prefill, _, num_decode = batch_info_host.tolist()
    out, offset = [], 0
    for s, p0, slot in zip(seq_len_host[:num_prefill].tolist(), input_pos_host[:num_prefill].tolist(),
                           slot_idx_host[:num_prefill].tolist()):
        out.append((offset, s, p0, slot))
        offset += s
    return out, num_prefill, num_decode


def started(state: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Rows of gathered state, zeroed where the sequence has nothing cached yet (input_pos 0)."""
    keep = (input_pos > 0).to(state.dtype).view(-1, *([1] * (state.dim() - 1)))
    return state * keep


def run_with_state(scan: Scan, tokens: list[torch.Tensor], state: torch.Tensor, out: torch.Tensor,
                   batch_info_host: torch.Tensor, seq_len_host: torch.Tensor, input_pos_host: torch.Tensor,
                   slot_idx_host: torch.Tensor, slot_idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Fill `out` [1, T, ...] from per-token inputs [1, T, ...], reading and writing each sequence's state row.

    Prefills scan from zeros (input_pos 0) or from their row (chunked prefill) and write the final state back;
    decodes advance every row at once with one gather and one scatter, without a host sync.
    """
    prefills, num_prefill, num_decode = prefill_rows(batch_info_host, seq_len_host, input_pos_host, slot_idx_host)
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
        prev = started(state.index_select(0, rows), input_pos[num_prefill : num_prefill + num_decode])
        y, new = scan(*(t[0, sl, None] for t in tokens), prev)  # each decode row: a batch entry of one token
        out[0, sl] = y[:, 0].to(out.dtype)
        state.index_copy_(0, rows, new.to(state.dtype))
    return out
