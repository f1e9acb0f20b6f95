"""Canonical rotary-embedding ops: HF rotate_half with explicit cos/sin, interleaved pairs, complex frequencies."""

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@torch.library.custom_op("auto_deploy::torch_rope_with_explicit_cos_sin", mutates_args=())
def torch_rope_with_explicit_cos_sin(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF `apply_rotary_pos_emb`: x * cos + rotate_half(x) * sin, cos/sin [b, s, d] unsqueezed at `unsqueeze_dim`."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def _rotated_fake(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, *_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The fake of both cos/sin ops: q and k's shapes, each promoted with cos's dtype."""
    return q.new_empty(q.shape, dtype=torch.result_type(q, cos)), k.new_empty(k.shape, dtype=torch.result_type(k, cos))


torch_rope_with_explicit_cos_sin.register_fake(_rotated_fake)


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Pairs (x0, x1), (x2, x3), ... each rotated by one angle; the output is de-interleaved (evens first),
    # exactly like DeepSeek's apply_rotary_pos_emb_interleave.
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@torch.library.custom_op("auto_deploy::torch_rope_with_qk_interleaving", mutates_args=())
def torch_rope_with_qk_interleaving(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek interleaved RoPE; cos/sin are HF's cat(freqs, freqs) [b, s, d], only the first half is used."""
    half = cos.shape[-1] // 2
    cos = cos[..., :half].unsqueeze(unsqueeze_dim)
    sin = sin[..., :half].unsqueeze(unsqueeze_dim)
    return _rotate_interleaved(q, cos, sin), _rotate_interleaved(k, cos, sin)


torch_rope_with_qk_interleaving.register_fake(_rotated_fake)


def _rotate_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


@torch.library.custom_op("auto_deploy::torch_rope_with_complex_freqs", mutates_args=())
def torch_rope_with_complex_freqs(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor, unsqueeze_dim: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama-4 RoPE: adjacent pairs as complex numbers times freqs_cis [b, s, d/2] (complex) unsqueezed."""
    freqs = freqs_cis.unsqueeze(unsqueeze_dim)
    return _rotate_complex(xq, freqs), _rotate_complex(xk, freqs)


@torch_rope_with_complex_freqs.register_fake
def _complex_fake(xq: torch.Tensor, xk: torch.Tensor, *_: object) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(xq), torch.empty_like(xk)
