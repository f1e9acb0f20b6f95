"""Canonical gated linear attention `auto_deploy::torch_linear_attention` (MiniMax lightning attention).

Per head, a state S [dk, dv] decays by exp(g_t) and accumulates k_t v_t^T; the output reads it with the query:
o_t = q_t^T S_t (no softmax, no query scaling). MiniMax uses a constant decay per head (g_t = -slope). Prefills
are computed in closed form per chunk of CHUNK tokens, decodes step once, all in float32. The op runs from a
zero state (the export path); the runtime's cached version continues from each sequence's stored state.
"""

import torch

CHUNK = 64

# Chunked forms of decayed linear recurrences, shared with the gated delta rule. Inside a chunk, G is the
# cumulative log decay (G_i = g_1 + ... + g_i) and ratio[i, j] = e^{G_i - G_j} for j <= i (0 above the diagonal).


def chunk_decay(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g [b, h, C] -> (G [b, h, C], ratio [b, h, C, C])."""
    G = g.cumsum(-1)
    C = G.shape[-1]
    lower = torch.ones(C, C, dtype=torch.bool, device=g.device).tril()
    return G, torch.where(lower, G[..., :, None] - G[..., None, :], float("-inf")).exp()


def read_and_write(q: torch.Tensor, k: torch.Tensor, u: torch.Tensor, G: torch.Tensor, ratio: torch.Tensor,
                   S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token i adds k_i u_i^T to the decaying state S [b, h, dk, dv] and reads it with q_i: (out [b, h, C, dv], S')."""
    out = G.exp()[..., None] * (q @ S) + (ratio * (q @ k.transpose(-1, -2))) @ u
    S = G[..., -1, None, None].exp() * S + (k * (G[..., -1:] - G).exp()[..., None]).transpose(-1, -2) @ u
    return out, S


def scan_chunks(
    chunk_fn, tensors: list[torch.Tensor], S: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `chunk_fn(*chunk tensors, S) -> (out, S)` over heads-first tensors [b, h, s, ...], `chunk` tokens at a
    time; returns (out [b, s, h, dv], final S)."""
    outs = []
    for c0 in range(0, tensors[0].shape[2], chunk):
        o, S = chunk_fn(*(t[:, :, c0 : c0 + chunk] for t in tensors), S)
        outs.append(o)
    return torch.cat(outs, dim=2).transpose(1, 2), S


def linear_attention_scan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k [b, s, h, dk], v [b, s, h, dv], g [b, s, h] (log decay <= 0); state [b, h, dk, dv] or None (zeros).

    Returns (out [b, s, h, dv] float32, final state [b, h, dk, dv] float32).
    """
    q, k, v, g = (t.to(torch.float32).transpose(1, 2) for t in (q, k, v, g))  # heads first: [b, h, s, ...]
    b, h, s, dk = k.shape
    S = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state.to(torch.float32).clone()

    def chunk_fn(q, k, v, g, S):
        return read_and_write(q, k, v, *chunk_decay(g), S)

    return scan_chunks(chunk_fn, [q, k, v, g], S, CHUNK)


@torch.library.custom_op("auto_deploy::torch_linear_attention", mutates_args=())
def torch_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """From a zero state: q/k [b, s, h, dk], v [b, s, h, dv], g [b, s, h] -> [b, s, h, dv] in q's dtype."""
    return linear_attention_scan(q, k, v, g)[0].to(q.dtype)


def out_like_v(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: object) -> torch.Tensor:
    """The fake of this op and of torch_gated_delta_rule: v's shape in q's dtype."""
    return q.new_empty(*v.shape)


torch_linear_attention.register_fake(out_like_v)
