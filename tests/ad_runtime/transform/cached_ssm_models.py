"""A small exported Mamba2-style model calling torch_causal_conv1d and torch_ssm directly, and a step driver."""

import ad_compiler.custom_ops  # noqa: F401
import torch
import torch.nn as nn
import torch.nn.functional as F
from ad_runtime.kv_cache.interface import CachedSequenceInterface, StepSequence


class TinyMambaModel(nn.Module):
    """Embedding, `n_layers` residual mixers (in_proj -> conv over x/B/C -> silu -> scan -> out_proj), lm head."""

    def __init__(self, vocab: int = 32, hidden: int = 16, heads: int = 4, head_dim: int = 4, groups: int = 2,
                 state: int = 3, kernel: int = 4, n_layers: int = 2, chunk_size: int = 4):
        super().__init__()
        self.h, self.p, self.g, self.n, self.chunk = heads, head_dim, groups, state, chunk_size
        self.conv_dim = heads * head_dim + 2 * groups * state
        self.emb = nn.Embedding(vocab, hidden)
        self.in_proj = nn.ModuleList(nn.Linear(hidden, self.conv_dim + heads) for _ in range(n_layers))
        self.conv_w = nn.ParameterList(nn.Parameter(torch.randn(self.conv_dim, kernel) / 2) for _ in range(n_layers))
        self.conv_b = nn.ParameterList(nn.Parameter(torch.randn(self.conv_dim) / 4) for _ in range(n_layers))
        self.A = nn.ParameterList(nn.Parameter(-torch.rand(heads) - 0.2) for _ in range(n_layers))
        self.D = nn.ParameterList(nn.Parameter(torch.randn(heads)) for _ in range(n_layers))
        self.dt_bias = nn.ParameterList(nn.Parameter(torch.randn(heads) / 2) for _ in range(n_layers))
        self.out_proj = nn.ModuleList(nn.Linear(heads * head_dim, hidden) for _ in range(n_layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        b, s, _ = x.shape
        for i, (inp, out) in enumerate(zip(self.in_proj, self.out_proj)):
            xbc, dt = inp(x).split([self.conv_dim, self.h], dim=-1)
            xbc = F.silu(torch.ops.auto_deploy.torch_causal_conv1d(xbc, self.conv_w[i], self.conv_b[i]))
            xs, B, C = xbc.split([self.h * self.p, self.g * self.n, self.g * self.n], dim=-1)
            y = torch.ops.auto_deploy.torch_ssm(
                xs.view(b, s, self.h, self.p), dt, self.A[i], B.view(b, s, self.g, self.n),
                C.view(b, s, self.g, self.n), self.D[i], self.dt_bias[i], self.chunk, 0.0, float("inf"),
            )
            x = x + out(y.reshape(b, s, -1).to(x.dtype))
        return self.head(x)


def run_steps(gm: nn.Module, cm: CachedSequenceInterface, steps: list[list[tuple[int, list[int], int]]]) -> list:
    """Run steps of (sequence id, new tokens, tokens already cached); a sequence's slot is its id.

    Returns each step's logits [1, T, vocab]. Pages come from the cm's pool, keyed by sequence id.
    """
    outs = []
    for step in steps:
        seqs = []
        for sid, toks, cached in step:
            cm.pool.ensure_capacity(sid, cached + len(toks))
            seqs.append(StepSequence(toks, cached, cm.pool.page_table(sid), sid))
        cm.update(seqs)
        with torch.no_grad():
            outs.append(gm(**cm.named_args))
    return outs


def uncached_logits(model: nn.Module, tokens: list[int]) -> torch.Tensor:
    """The uncached model on one whole sequence: [len(tokens), vocab]."""
    with torch.no_grad():
        return model(torch.tensor([tokens]), torch.arange(len(tokens))[None])[0]


# Prefills of different lengths, a chunked prefill continuing from its state, then decodes in another slot order.
_A, _B, _C = list(range(1, 12)), [5, 9, 2], [7, 3, 3, 8, 1, 4, 6]
MIXED_STEPS = [
    [(0, _A[:6], 0), (1, _B, 0)],  # a: first chunk of its prompt; b: whole prompt
    [(0, _A[6:], 6), (2, _C, 0), (1, [11], 3)],  # a continues from its state; c starts; b decodes
    [(1, [12], 4), (0, [13], 11), (2, [14], 7)],  # decodes only, rows in another slot order
]


def assert_steps_equal_whole_sequences(model: nn.Module, gm: nn.Module, cm: CachedSequenceInterface) -> None:
    """Run MIXED_STEPS through the cached graph; every output row equals the uncached model on the sequence so far."""
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for step, out in zip(MIXED_STEPS, run_steps(gm, cm, MIXED_STEPS)):
        off = 0
        for sid, toks, _ in step:
            seen[sid] += toks
            ref = uncached_logits(model, seen[sid])[-len(toks):]
            torch.testing.assert_close(out[0, off : off + len(toks)], ref, rtol=1e-4, atol=1e-5)
            off += len(toks)
