"""find_unmatched_attention: eager attention left in aten ops is found; routers, MoE products and the canonical op are not."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from ad_compiler.utils.unmatched_attention import find_unmatched_attention


class EagerAttention(nn.Module):
    """HF-style eager attention with a gpt-oss sink column: softmax(cat(q k^T * s, sink)) v."""

    def __init__(self, sinks: bool):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.sinks = nn.Parameter(torch.zeros(2)) if sinks else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, 2, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.35
        if self.sinks is not None:
            scores = torch.cat([scores, self.sinks.reshape(1, -1, 1, 1).expand(b, -1, s, 1)], dim=-1)
        probs = F.softmax(scores - scores.max(dim=-1, keepdim=True).values, dim=-1)
        if self.sinks is not None:
            probs = probs[..., :-1]
        return torch.matmul(probs, v).transpose(1, 2).reshape(b, s, 16)


class Router(nn.Module):
    """MoE routing: softmax over a linear of the hidden states, experts as a batched product with weights."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 4, bias=False)
        self.experts = nn.Parameter(torch.randn(4, 16, 16))
        self.table = nn.Parameter(torch.randn(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = F.softmax(self.gate(x), dim=-1)  # a projection: not attention
        other = F.softmax(torch.matmul(x, self.table), dim=-1)  # activation x weights: not attention
        picked = self.experts[weights.argmax(-1)]  # [b, s, 16, 16] indexed by routing
        out = torch.matmul(x.unsqueeze(-2), picked).squeeze(-2)
        return out * weights.max(-1, keepdim=True).values + other.sum(-1, keepdim=True)


def _graph(module: nn.Module):
    return torch.export.export(module, (torch.randn(2, 5, 16),)).module()


def test_eager_attention_is_found():
    for sinks in (False, True):
        found = find_unmatched_attention(_graph(EagerAttention(sinks)))
        assert len(found) == 1, f"sinks={sinks}: {found}"
        softmax, product = found[0]
        assert "softmax" in str(softmax.target)
        assert any(op in str(product.target) for op in ("matmul", "bmm")), product.target


def test_router_and_expert_products_are_not_attention():
    assert find_unmatched_attention(_graph(Router())) == []


def test_canonical_attention_is_not_reported():
    import ad_compiler.custom_ops.attention  # noqa: F401

    class Canonical(nn.Module):
        def forward(self, q, k, v):
            return torch.ops.auto_deploy.torch_attention(q, k, v, None, 0.0, True, None, None, None, None, "bnsd")

    q = torch.randn(1, 2, 5, 8)
    gm = torch.export.export(Canonical(), (q, q, q)).module()
    assert find_unmatched_attention(gm) == []
