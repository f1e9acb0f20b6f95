"""Canonical Mamba2 ops: `auto_deploy::torch_causal_conv1d` (depthwise causal conv) and `auto_deploy::torch_ssm`
(the selective state-space scan), plus the plain functions the runtime's cached versions reuse.

Shapes (b batch, s tokens, c channels, k kernel, h heads, p head dim, g groups, n state size):
    torch_causal_conv1d(x [b, s, c], weight [c, k], bias [c] | None) -> [b, s, c]          (x's dtype)
    torch_ssm(x [b, s, h, p], dt [b, s, h], A [h], B [b, s, g, n], C [b, s, g, n], D [h], dt_bias [h],
              chunk_size, dt_min, dt_max) -> y [b, s, h, p]                                  (float32)
The state recurrence per head: S_t = exp(dt_t * A) S_{t-1} + dt_t x_t B_t^T,  y_t = S_t C_t + D x_t, with
dt = clamp(softplus(dt + dt_bias), dt_min, dt_max) and head i reading group i // (h / g).
"""

import torch
import torch.nn.functional as F


def causal_conv1d_with_state(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, s, c] after the k-1 inputs `state` [b, c, k-1] (zeros if None) -> (y [b, s, c], new state [b, c, k-1])."""
    b, s, c = x.shape
    k = weight.shape[-1]
    xt = x.transpose(1, 2).to(weight.dtype)  # [b, c, s]
    prev = state.to(weight.dtype) if state is not None else xt.new_zeros(b, c, k - 1)
    full = torch.cat([prev, xt], dim=-1)  # [b, c, k - 1 + s]
    y = F.conv1d(full, weight.unsqueeze(1), bias, groups=c)  # no padding: exactly s outputs
    return y.transpose(1, 2).to(x.dtype), full[:, :, full.shape[-1] - (k - 1) :]


def ssm_discretize(dt: torch.Tensor, dt_bias: torch.Tensor, dt_min: float, dt_max: float) -> torch.Tensor:
    """The per-token step size in float32: clamp(softplus(dt + dt_bias), dt_min, dt_max)."""
    return torch.clamp(F.softplus(dt.float() + dt_bias.float()), min=dt_min, max=dt_max)


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """[..., g, n] -> [..., h, n]: each group serves h // g consecutive heads."""
    return t.float().repeat_interleave(h // t.shape[-2], dim=-2, output_size=h)


def ssm_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    chunk_size: int, state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scan over s tokens with discretized dt [b, s, h] (float32), from `state` [b, h, p, n] (zeros when None).

    Chunked: inside a chunk every output is a masked, decayed sum over earlier tokens of the chunk (a matrix
    product), and one state carries over between chunks, so the Python loop runs s / chunk_size times.
    Returns (y [b, s, h, p] float32, final state [b, h, p, n] float32).
    """
    bsz, s, h, p = x.shape
    n = B.shape[-1]
    xf, Bh, Ch = x.float(), _heads(B, h), _heads(C, h)
    a = dt * A.float()  # [b, s, h] log-decay per token (A < 0)
    S = state.float() if state is not None else x.new_zeros(bsz, h, p, n, dtype=torch.float32)
    ys = []
    for start in range(0, s, chunk_size):
        sl = slice(start, min(start + chunk_size, s))
        ac = torch.cumsum(a[:, sl], dim=1).transpose(1, 2)  # [b, h, L] cumulative log-decay
        xdt = (xf[:, sl] * dt[:, sl, :, None]).transpose(1, 2)  # [b, h, L, p]
        Bc, Cc = Bh[:, sl].transpose(1, 2), Ch[:, sl].transpose(1, 2)  # [b, h, L, n]
        L = ac.shape[-1]
        # decay[t, j] = exp(ac_t - ac_j) for j <= t; masked before exp so no inf * 0 appears.
        diff = ac[..., :, None] - ac[..., None, :]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        decay = torch.exp(diff.masked_fill(~causal, float("-inf")))
        scores = torch.matmul(Cc, Bc.transpose(-1, -2)) * decay  # [b, h, L, L]
        y = torch.matmul(scores, xdt)  # within the chunk
        y = y + torch.matmul(Cc, S.transpose(-1, -2)) * torch.exp(ac)[..., None]  # carried-in state
        to_end = torch.exp(ac[..., -1:] - ac)  # [b, h, L]
        S = S * torch.exp(ac[..., -1])[..., None, None] + torch.matmul((xdt * to_end[..., None]).transpose(-1, -2), Bc)
        ys.append(y.transpose(1, 2))  # [b, L, h, p]
    y = torch.cat(ys, dim=1) if ys else xf.new_zeros(bsz, 0, h, p)
    return y + xf * D.float()[:, None], S


def ssm_step(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row: x [r, h, p], dt [r, h] (discretized), B/C [r, g, n], state [r, h, p, n] -> (y, new state)."""
    h = x.shape[1]
    xf = x.float()
    decay = torch.exp(dt * A.float())[..., None, None]  # [r, h, 1, 1]
    S = state.float() * decay + (xf * dt[..., None])[..., None] * _heads(B, h)[:, :, None, :]
    y = torch.matmul(S, _heads(C, h)[..., None])[..., 0]  # [r, h, p]
    return y + xf * D.float()[:, None], S


@torch.library.custom_op("auto_deploy::torch_causal_conv1d", mutates_args=())
def torch_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over the token axis: x [b, s, c], weight [c, k] -> [b, s, c]."""
    # Contiguous like the fake: the conv's [b, s, c] is a transposed view, and a graph traced with the fake's
    # strides may hold a view() that such a layout cannot take.
    return causal_conv1d_with_state(x, weight, bias, None)[0].contiguous()


def conv1d_out(x: torch.Tensor, *_: object) -> torch.Tensor:
    """An empty conv output for x [b, s, c]: the fake of this op and of the runtime's cached one, whose other
    arguments never change the output (the dispatcher has checked them against the schema already)."""
    return torch.empty_like(x)


torch_causal_conv1d.register_fake(conv1d_out)


@torch.library.custom_op("auto_deploy::torch_ssm", mutates_args=())
def torch_ssm(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    chunk_size: int,
    dt_min: float,
    dt_max: float,
) -> torch.Tensor:
    """The Mamba2 selective scan from a zero state: x [b, s, h, p] -> y [b, s, h, p] in float32."""
    return ssm_scan(x, ssm_discretize(dt, dt_bias, dt_min, dt_max), A, B, C, D, chunk_size)[0]


def ssm_out(x: torch.Tensor, *_: object) -> torch.Tensor:
    """An empty float32 output for x [b, s, h, p]: the fake of this op and of the runtime's cached one, as for
    `conv1d_out`."""
    return x.new_empty(x.shape, dtype=torch.float32)


torch_ssm.register_fake(ssm_out)
