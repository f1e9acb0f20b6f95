"""match_moe_pattern: Mixtral / Qwen2-MoE / Qwen3-MoE experts blocks become torch_moe, outputs unchanged."""

import pytest
import torch
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.transform.interface import SharedConfig, TransformRegistry
from ad_compiler.utils.graph_utils import canonicalize_graph, count_op, run_shape_prop
from torch.fx import GraphModule
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
from hf_logits import Logits

aten = torch.ops.aten
ad = torch.ops.auto_deploy
D = torch.export.Dim.DYNAMIC
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2)


def _batch(b: int, s: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, 128, (b, s)), "position_ids": torch.arange(s).expand(b, s).contiguous()}


def _export(cfg, impl: str) -> tuple[GraphModule, torch.nn.Module]:
    torch.manual_seed(0)
    cfg._experts_implementation = impl
    model = AutoModelForCausalLM.from_config(cfg).eval()
    shapes = {"input_ids": {0: D, 1: D}, "position_ids": {0: D, 1: D}}
    return torch_export_to_gm(Logits(model), (), _batch(2, 6), dynamic_shapes=shapes), model


def _run(gm: GraphModule) -> tuple[GraphModule, int]:
    gm = TransformRegistry.get("match_moe_pattern")()(gm, None, None, SharedConfig())
    return gm, gm._transform_history["match_moe_pattern"].num_matches


CASES = {
    "mixtral-grouped_mm": (lambda: MixtralConfig(num_local_experts=4, **COMMON), "grouped_mm"),
    "mixtral-batched_mm": (lambda: MixtralConfig(num_local_experts=4, **COMMON), "batched_mm"),
    "qwen2moe-shared-experts": (
        lambda: Qwen2MoeConfig(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=48, **COMMON),
        "grouped_mm",
    ),
    "qwen3moe-normalised": (
        lambda: Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32, norm_topk_prob=True, **COMMON), "grouped_mm"
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_moe_blocks_become_torch_moe(case):
    make_cfg, impl = CASES[case]
    gm, model = _export(make_cfg(), impl)
    n_linear_before = count_op(gm, aten.linear)
    assert count_op(gm, ad.torch_moe) == 0
    batch = _batch(3, 9)  # other shapes than at export: the dynamic dims still work
    before = gm(**batch)

    gm, matches = _run(gm)

    assert matches == 2
    run_shape_prop(gm)  # the rewritten graph still propagates fake (symbolic) shapes
    assert count_op(gm, ad.torch_moe) == 2
    # The experts maths is gone (no grouped GEMMs / bmm / sorting left); the router stays.
    assert count_op(gm, (aten.bmm, aten.sort, aten.histc, aten.index_put_, aten.index_put)) == 0
    assert not any("grouped_mm" in str(n.target) for n in gm.graph.nodes)
    assert count_op(gm, aten.topk) == 2
    # Router, attention and (for Qwen2-MoE) shared-expert linears are untouched.
    assert count_op(gm, aten.linear) == n_linear_before
    # Stacked expert weights are passed as they are: state-dict keys stay HF's.
    moe = next(n for n in gm.graph.nodes if n.target == ad.torch_moe.default)
    assert [a.target for a in moe.args[3:5]] == [
        "model.model.layers.0.mlp.experts.gate_up_proj", "model.model.layers.0.mlp.experts.down_proj"
    ]
    after = gm(**batch)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    # And equal to Hugging Face's own eager experts loop.
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        hf = model(**batch, use_cache=False).logits
    torch.testing.assert_close(after, hf, atol=1e-5, rtol=1e-5)


class SigmoidTopK(torch.nn.Module):
    """Top-k over sigmoid scores with a dense weighted sum: not a softmax-routed experts block."""

    def __init__(self):
        super().__init__()
        self.router = torch.nn.Linear(16, 4, bias=False)
        self.w = torch.nn.Parameter(torch.randn(4, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vals, idx = torch.topk(torch.sigmoid(self.router(x)), 2, dim=-1)
        return x + (vals.sum(-1, keepdim=True) * torch.einsum("th,ehk->tk", x, self.w))


def test_other_topk_graphs_are_left_alone():
    gm = canonicalize_graph(torch_export_to_gm(SigmoidTopK(), (torch.randn(5, 16),), dynamic_shapes=({0: D},)))
    n_before = len(gm.graph.nodes)
    gm, matches = _run(gm)
    assert matches == 0
    assert count_op(gm, ad.torch_moe) == 0
    assert len(gm.graph.nodes) == n_before
