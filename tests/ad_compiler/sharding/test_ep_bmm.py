"""Expert parallelism (Mixtral-style torch_moe) and bmm batch sharding on gloo ranks equal one rank."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.utils.graph_utils import run_shape_prop
from sharding_harness import assert_shards_are_one_nth, run_ranks

import ad_compiler.custom_ops  # noqa: F401 - torch.ops.auto_deploy.torch_moe


class TinyMoE(nn.Module):
    """Embedding, a residual MoE block (router + stacked experts, top-2 like Mixtral) and an lm head."""

    def __init__(self, vocab: int = 64, hidden: int = 32, inter: int = 24, experts: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * inter, hidden) / hidden**0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, inter) / inter**0.5)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        x = h.reshape(-1, h.shape[-1])
        weights, experts = torch.topk(F.softmax(self.gate(x), dim=-1), 2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        moe = torch.ops.auto_deploy.torch_moe(x, experts, weights, self.gate_up, self.down)
        return self.lm_head(h + moe.view_as(h))


class TinyBmm(nn.Module):
    """Per-head projections as one bmm over stacked weights [heads, d, d]."""

    def __init__(self, vocab: int = 64, heads: int = 4, d: int = 8):
        super().__init__()
        self.heads, self.d = heads, d
        self.embed = nn.Embedding(vocab, heads * d)
        self.w = nn.Parameter(torch.randn(heads, d, d) / d**0.5)
        self.lm_head = nn.Linear(heads * d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        h = self.embed(input_ids).view(b * s, self.heads, self.d).transpose(0, 1)  # [heads, tokens, d]
        y = torch.bmm(h, self.w).transpose(0, 1).reshape(b, s, self.heads * self.d)
        return self.lm_head(y)


def _export(model: nn.Module) -> tuple:
    torch.manual_seed(3)
    inputs = {"input_ids": torch.randint(0, 64, (2, 6)), "position_ids": torch.arange(6).expand(2, 6).contiguous()}
    gm = run_shape_prop(torch_export_to_gm(model.eval(), kwargs=inputs))
    with torch.no_grad():
        return gm, inputs, model(**inputs)


@pytest.mark.parametrize("world", [2, 4])
def test_moe_expert_parallel_matches(world: int) -> None:
    torch.manual_seed(0)
    gm, inputs, ref = _export(TinyMoE())
    results = run_ranks(gm, inputs, world, detect={"sharding_dims": ["ep"]})
    for r in results:
        torch.testing.assert_close(r["logits"], ref, rtol=1e-5, atol=1e-5)
        assert set(r["kinds"].values()) == {"expert"}
        assert_shards_are_one_nth(r, world)


@pytest.mark.parametrize("world", [2, 4])
def test_bmm_batch_split_matches(world: int) -> None:
    torch.manual_seed(0)
    gm, inputs, ref = _export(TinyBmm())
    results = run_ranks(gm, inputs, world, detect={"sharding_dims": ["bmm"]})
    for r in results:
        torch.testing.assert_close(r["logits"], ref, rtol=1e-5, atol=1e-5)
        assert set(r["kinds"].values()) == {"bmm"}
        assert_shards_are_one_nth(r, world)
