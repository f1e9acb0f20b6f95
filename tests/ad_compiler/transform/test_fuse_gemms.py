"""fuse_gemms: linears sharing an input (q/k/v, gate/up) become one linear + split, outputs unchanged."""

import torch
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.transform.interface import SharedConfig, TransformRegistry
from ad_compiler.utils.graph_utils import count_op, run_shape_prop
from torch.fx import GraphModule
from transformers import AutoModelForCausalLM, LlamaConfig
from hf_logits import Logits

aten = torch.ops.aten
D = torch.export.Dim.DYNAMIC


def _run(gm: GraphModule) -> tuple[GraphModule, int]:
    gm = TransformRegistry.get("fuse_gemms")()(gm, None, None, SharedConfig())
    return gm, gm._transform_history["fuse_gemms"].num_matches


def test_tiny_llama_qkv_and_gate_up():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    batch = {"input_ids": torch.randint(0, 128, (2, 6)), "position_ids": torch.arange(6).expand(2, 6).contiguous()}
    shapes = {"input_ids": {0: D, 1: D}, "position_ids": {0: D, 1: D}}
    gm = torch_export_to_gm(Logits(model), (), batch, dynamic_shapes=shapes)
    batch = {"input_ids": torch.randint(0, 128, (3, 9)), "position_ids": torch.arange(9).expand(3, 9).contiguous()}
    before = gm(**batch)
    # Per layer q, k, v, o, gate, up, down; plus lm_head.
    assert count_op(gm, aten.linear) == 2 * 7 + 1

    gm, matches = _run(gm)

    assert matches == 4  # qkv and gate/up in each of 2 layers
    # The new linear, split and parts carry shapes straight away (later transforms read them without propagating).
    for split in [n for n in gm.graph.nodes if n.target == aten.split_with_sizes.default]:
        fused, parts = split.args[0], list(split.users)
        assert fused.meta["val"].shape[-1] == sum(p.meta["val"].shape[-1] for p in parts)
        assert [p.meta["val"].shape[-1] for p in parts] == list(split.args[1])
    run_shape_prop(gm)  # the rewritten graph still propagates fake (symbolic) shapes
    assert count_op(gm, aten.linear) == 2 * 4 + 1
    assert count_op(gm, aten.split_with_sizes) == 4
    keys = set(gm.state_dict())
    attn = "model.model.layers.0.self_attn"
    assert f"{attn}.q_proj.weight" not in keys and f"{attn}.v_proj.weight" not in keys
    assert gm.state_dict()[f"{attn}.fused_q_proj_k_proj_v_proj_weight"].shape == (64 + 32 + 32, 64)
    assert gm.state_dict()["model.model.layers.1.mlp.fused_gate_proj_up_proj_weight"].shape == (256, 64)
    assert f"{attn}.o_proj.weight" in keys  # o_proj reads the attention output alone
    torch.testing.assert_close(gm(**batch), before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(gm(**batch), model(**batch, use_cache=False).logits, atol=1e-5, rtol=1e-5)


class Mixed(torch.nn.Module):
    """Biased q/k/v, one bias-free linear on the same input, and a linear on another input."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(8, n) for n in (8, 4, 4))
        self.plain = torch.nn.Linear(8, 3, bias=False)
        self.other = torch.nn.Linear(8, 5, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x) * 2, self.v(x), self.plain(x), self.other(y)], -1)


def test_biases_fuse_only_with_biases():
    torch.manual_seed(0)
    model = Mixed()
    gm = torch_export_to_gm(model, (torch.randn(3, 8), torch.randn(3, 8)), dynamic_shapes=({0: D}, {0: D}))
    x, y = torch.randn(7, 8), torch.randn(7, 8)
    before = gm(x, y)

    gm, matches = _run(gm)

    assert matches == 1
    assert count_op(gm, aten.linear) == 3  # fused qkv, plain, other
    sd = gm.state_dict()
    assert sd["fused_q_k_v_weight"].shape == (16, 8) and sd["fused_q_k_v_bias"].shape == (16,)
    assert "plain.weight" in sd and "other.weight" in sd and "q.bias" not in sd
    torch.testing.assert_close(gm(x, y), before)
    torch.testing.assert_close(gm(x, y), model(x, y))


def test_single_linears_untouched():
    gm = torch_export_to_gm(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
    keys = set(gm.state_dict())
    gm, matches = _run(gm)
    assert matches == 0 and set(gm.state_dict()) == keys and count_op(gm, aten.linear) == 2
