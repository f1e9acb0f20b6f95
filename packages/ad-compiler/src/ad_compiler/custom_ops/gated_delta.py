"""Canonical gated delta rule `auto_deploy::torch_gated_delta_rule` (Qwen3-Next / Qwen3.5 linear attention).

Per head, a state S [dk, dv] is decayed by exp(g_t), corrected towards v_t along k_t with learning rate
beta_t (the delta rule: S += k_t (beta_t (v_t - k_t^T S))), and read by the query: o_t = q_t^T S. Queries and
keys are optionally L2-normalised and queries scaled by dk^-1/2, all in float32. Prefills are solved in
chunks of CHUNK tokens (one triangular solve each), decodes step once. The op runs from a zero state (the
export path); the runtime's cached version continues from each sequence's stored state.
"""

import torch

from .linear_attention import chunk_decay, out_like_v, read_and_write, scan_chunks


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


CHUNK = 64  # tokens solved together in a prefill; decodes (one token) take the plain step


def _step(q, k, v, decay, beta, S):
    """One token for every row: S [b, h, dk, dv] -> (o [b, h, dv], S')."""
    S = S * decay[..., None, None]
    delta = (v - torch.einsum("bhk,bhkv->bhv", k, S)) * beta[..., None]
    S = S + k[..., :, None] * delta[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q, S), S


def _chunk(q, k, v, log_decay, beta, S):
    """A chunk of C tokens at once. q/k [b, h, C, dk], v [b, h, C, dv], log_decay/beta [b, h, C], S [b, h, dk, dv].

    With G the cumulative log decay inside the chunk, the corrections u_i that token i writes (S grows by
    k_i u_i^T) solve a unit lower-triangular system: u_i + sum_{j<i} beta_i e^{G_i - G_j} (k_i.k_j) u_j
    = beta_i (v_i - e^{G_i} k_i^T S). Outputs and the final state then follow as for plain linear attention.
    """
    C = q.shape[2]
    G, ratio = chunk_decay(log_decay)
    A = (beta[..., None] * ratio * (k @ k.transpose(-1, -2))).tril(-1) + torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = beta[..., None] * (v - G.exp()[..., None] * (k @ S))
    u = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # [b, h, C, dv]
    return read_and_write(q, k, u, G, ratio, S)


def gated_delta_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k [b, s, h, dk], v [b, s, h, dv], g/beta [b, s, h]; state [b, h, dk, dv] or None (zeros).

    Returns (out [b, s, h, dv] float32, final state [b, h, dk, dv] float32), all computed in float32.
    """
    q, k, v, g, beta = (t.to(torch.float32) for t in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * q.shape[-1] ** -0.5
    b, s, h, dk = k.shape
    S = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state.to(torch.float32).clone()
    if s == 1:
        o, S = _step(q[:, 0], k[:, 0], v[:, 0], g[:, 0].exp(), beta[:, 0], S)
        return o[:, None], S
    return scan_chunks(_chunk, [t.transpose(1, 2) for t in (q, k, v, g, beta)], S, CHUNK)  # heads first


@torch.library.custom_op("auto_deploy::torch_gated_delta_rule", mutates_args=())
def torch_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, use_qk_l2norm: bool
) -> torch.Tensor:
    """From a zero state: q/k [b, s, h, dk], v [b, s, h, dv], g/beta [b, s, h] -> [b, s, h, dv] in q's dtype."""
    return gated_delta_scan(q, k, v, g, beta, None, use_qk_l2norm)[0].to(q.dtype)


torch_gated_delta_rule.register_fake(out_like_v)
