"""Small exported models that call torch_attention directly, for the runtime transform tests."""

import ad_compiler.custom_ops  # noqa: F401
import torch
import torch.nn as nn
from ad_compiler.export import torch_export_to_gm
from torch.export import Dim
from torch.fx import GraphModule


class TinyAttentionModel(nn.Module):
    """Embedding, `n_layers` GQA attention blocks (q/k/v/o projections, no RoPE), lm head."""

    def __init__(self, vocab: int = 32, hidden: int = 32, n_heads: int = 4, n_kv: int = 2, n_layers: int = 2,
                 layout: str = "bsnd", sliding_window: int | None = None):
        super().__init__()
        self.n_heads, self.n_kv, self.d = n_heads, n_kv, hidden // n_heads
        self.layout, self.sliding_window = layout, sliding_window
        self.emb = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(64, hidden)  # positions matter: cached steps must see the right ones
        self.qkv = nn.ModuleList(nn.Linear(hidden, (n_heads + 2 * n_kv) * self.d) for _ in range(n_layers))
        self.o = nn.ModuleList(nn.Linear(n_heads * self.d, hidden) for _ in range(n_layers))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids) + self.pos(position_ids)
        b, s, _ = x.shape
        for qkv, o in zip(self.qkv, self.o):
            q, k, v = qkv(x).split([self.n_heads * self.d, self.n_kv * self.d, self.n_kv * self.d], dim=-1)
            q = q.view(b, s, self.n_heads, self.d)
            k = k.view(b, s, self.n_kv, self.d)
            v = v.view(b, s, self.n_kv, self.d)
            if self.layout == "bnsd":
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            a = torch.ops.auto_deploy.torch_attention(
                q, k, v, None, 0.0, True, None, None, self.sliding_window, None, self.layout
            )
            if self.layout == "bnsd":
                a = a.transpose(1, 2)
            x = x + o(a.reshape(b, s, -1))
        return self.head(x)


def export_tiny(model: nn.Module, batch: int = 2, seq: int = 6) -> GraphModule:
    ids = torch.randint(0, 32, (batch, seq))
    pos = torch.arange(seq).expand(batch, seq)
    dyn = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
    return torch_export_to_gm(model, kwargs={"input_ids": ids, "position_ids": pos},
                              dynamic_shapes={"input_ids": dyn, "position_ids": dyn})
