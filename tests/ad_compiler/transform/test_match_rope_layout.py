"""match_rope_layout: RoPE ops end up in the expected layout with the transposes moved around them."""

import pytest
import torch
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.transform.interface import SharedConfig, TransformRegistry
from ad_compiler.utils.graph_utils import count_op, nodes_calling
from torch.fx import GraphModule
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama4.modeling_llama4 import apply_rotary_emb
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from hf_logits import Logits

aten = torch.ops.aten
ad = torch.ops.auto_deploy
ROPES = [ad.torch_rope_with_explicit_cos_sin, ad.torch_rope_with_qk_interleaving, ad.torch_rope_with_complex_freqs]
D = torch.export.Dim.DYNAMIC


def transform(gm: GraphModule, name: str, config: dict | None = None) -> tuple[GraphModule, int]:
    gm = TransformRegistry.get(name)(config)(gm, None, None, SharedConfig())
    return gm, gm._transform_history[name].num_matches


def test_llama_rope_reads_projections_directly() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, intermediate_size=128)
    model = AutoModelForCausalLM.from_config(config).eval()
    inputs = dict(input_ids=torch.randint(0, 128, (2, 7)), position_ids=torch.arange(7).expand(2, 7))
    gm = torch_export_to_gm(Logits(model), (), inputs, dynamic_shapes={k: {0: D, 1: D} for k in inputs})
    ref = gm(**inputs)
    gm, _ = transform(gm, "match_rope_pattern")
    transposes = count_op(gm, aten.transpose)
    gm, n = transform(gm, "match_rope_layout")
    assert n == 2
    for node in nodes_calling(gm, ROPES):
        assert node.args[4] == 2
        # HF's view(b, s, n, d).transpose(1, 2) before RoPE is gone: the op reads the [b, s, n, d] view.
        assert all(is_view(a) for a in node.args[:2])
    # q/k transposes moved from before RoPE to after it (sdpa still wants bnsd): same count.
    assert count_op(gm, aten.transpose) == transposes
    torch.testing.assert_close(gm(**inputs), ref, rtol=0, atol=0)
    _, again = transform(gm, "match_rope_layout")
    assert again == 0


def is_view(node) -> bool:
    return node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class BsndRope(torch.nn.Module):
    """Rotary on [b, s, n, d] tensors (unsqueeze_dim=2), then a transpose back out like an attention would."""

    def forward(self, q, k, cos, sin):
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        return q.transpose(1, 2), k


def test_bsnd_to_bnsd() -> None:
    args = (torch.randn(2, 5, 3, 8), torch.randn(2, 5, 1, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    gm = torch_export_to_gm(BsndRope(), args, dynamic_shapes=tuple({0: D} for _ in args))
    gm, _ = transform(gm, "match_rope_pattern")
    _, none = transform(gm, "match_rope_layout", {"expected_layout": "bsnd"})
    assert none == 0
    gm, n = transform(gm, "match_rope_layout", {"expected_layout": "bnsd"})
    assert n == 1
    (node,) = nodes_calling(gm, ROPES)
    assert node.args[4] == 1
    # The q output's transpose(1, 2) is folded into the op's new layout: q's output is returned as is.
    out_q = list(gm.graph.find_nodes(op="output"))[0].args[0][0]
    assert out_q.args[0] is node
    for a, b in zip(gm(*args), BsndRope()(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class ComplexRope(torch.nn.Module):
    def forward(self, q, k, freqs):
        return apply_rotary_emb(q, k, freqs)


@pytest.mark.parametrize(("layout", "expected"), [("bsnd", 0), ("bnsd", 1)])
def test_complex_freqs(layout: str, expected: int) -> None:
    args = (torch.randn(2, 5, 3, 8), torch.randn(2, 5, 1, 8), torch.polar(torch.ones(2, 5, 4), torch.randn(2, 5, 4)))
    gm = torch_export_to_gm(ComplexRope(), args, dynamic_shapes=tuple({0: D} for _ in args))
    gm, _ = transform(gm, "match_rope_pattern")
    gm, n = transform(gm, "match_rope_layout", {"expected_layout": layout})
    assert n == expected
    (node,) = nodes_calling(gm, ROPES)
    assert node.args[3] == {"bsnd": 2, "bnsd": 1}[layout]
    for a, b in zip(gm(*args), ComplexRope()(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
