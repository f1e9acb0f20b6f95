"""Canonical gated linear attention `auto_deploy::torch_linear_attention` (MiniMax lightning attention).

Per head, a state S [dk, dv] decays by exp(g_t) and accumulates k_t v_t^T; the output reads it with the query:
o_t = q_t^T S_t (no softmax, no query scaling). MiniMax uses a constant decay per head (g_t = -slope). Prefills
are computed in closed form per chunk of CHUNK tokens, decodes step once, all in float32. The op runs from a
zero state (the export path); the runtime's cached version continues from each sequence's stored state.
"""

import torch

CHUNK = 64


def linear_attention_scan(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k [b, s, h, dk], v [b, s, h, dv], g [b, s, h] (log decay <= 0); state [b, h, dk, dv] or None (zeros).

    Returns (out [b, s, h, dv] float32, final state [b, h, dk, dv] float32).
    """
    q, k, v, g = (t.to(torch.float32).transpose(1, 2) for t in (q, k, v, g))  # heads first: [b, h, s, ...]
    b, h, s, dk = k.shape
    S = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state.to(torch.float32).clone()
    outs = []
    for c0 in range(0, s, CHUNK):
        qc, kc, vc = q[:, :, c0 : c0 + CHUNK], k[:, :, c0 : c0 + CHUNK], v[:, :, c0 : c0 + CHUNK]
        G = g[:, :, c0 : c0 + CHUNK].cumsum(-1)  # cumulative log decay inside the chunk
        C = G.shape[-1]
        lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        ratio = torch.where(lower, G[..., :, None] - G[..., None, :], float("-inf")).exp()  # e^{G_i - G_j}, j <= i
        outs.append(G.exp()[..., None] * (qc @ S) + (ratio * (qc @ kc.transpose(-1, -2))) @ vc)
        S = G[..., -1, None, None].exp() * S + (kc * (G[..., -1:] - G).exp()[..., None]).transpose(-1, -2) @ vc
    return torch.cat(outs, dim=2).transpose(1, 2), S


@torch.library.custom_op("auto_deploy::torch_linear_attention", mutates_args=())
def torch_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """From a zero state: q/k [b, s, h, dk], v [b, s, h, dv], g [b, s, h] -> [b, s, h, dv] in q's dtype."""
    return linear_attention_scan(q, k, v, g)[0].to(q.dtype)


@torch_linear_attention.register_fake
def _torch_linear_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return q.new_empty(*v.shape)
