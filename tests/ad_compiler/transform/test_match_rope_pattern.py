"""match_rope_pattern: HF RoPE subgraphs become torch_rope_* ops with unchanged outputs."""

import pytest
import torch
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.transform.interface import SharedConfig, TransformRegistry
from ad_compiler.utils.graph_utils import count_op
from torch.fx import GraphModule
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config, Qwen3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
from transformers.models.llama4.modeling_llama4 import apply_rotary_emb
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from hf_logits import Logits

aten = torch.ops.aten
ad = torch.ops.auto_deploy
SMALL = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=128, head_dim=16)
D = torch.export.Dim.DYNAMIC


def export_hf(config) -> tuple[GraphModule, dict]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    inputs = dict(input_ids=torch.randint(0, 128, (2, 7)), position_ids=torch.arange(3, 10).expand(2, 7))
    dyn = {k: {0: D, 1: D} for k in inputs}
    return torch_export_to_gm(Logits(model), (), inputs, dynamic_shapes=dyn), inputs


def export_fn(module: torch.nn.Module, *args: torch.Tensor) -> GraphModule:
    return torch_export_to_gm(module, args, dynamic_shapes=tuple({0: D} for _ in args))


def run(gm: GraphModule) -> tuple[GraphModule, int]:
    gm = TransformRegistry.get("match_rope_pattern")()(gm, None, None, SharedConfig())
    return gm, gm._transform_history["match_rope_pattern"].num_matches


@pytest.mark.parametrize(
    "config",
    [LlamaConfig(**SMALL), Qwen3Config(**SMALL), Phi3Config(**SMALL, partial_rotary_factor=0.5, pad_token_id=0)],
    ids=["llama", "qwen3", "phi3-partial"],
)
def test_hf_models_one_rope_per_layer(config) -> None:
    gm, inputs = export_hf(config)
    ref = gm(**inputs)
    assert count_op(gm, aten.neg) == 4  # rotate_half of q and k in two layers
    gm, n = run(gm)
    assert n == 2
    assert count_op(gm, ad.torch_rope_with_explicit_cos_sin) == 2
    assert count_op(gm, aten.neg) == 0
    torch.testing.assert_close(gm(**inputs), ref, rtol=0, atol=1e-6)
    # Partial rotary (Phi-3): only the rotated slice goes through the op, the rest passes through.
    rotated = int(16 * getattr(config, "partial_rotary_factor", 1.0))
    for node in gm.graph.nodes:
        if node.target == ad.torch_rope_with_explicit_cos_sin.default:
            assert node.args[0].meta["val"].shape[-1] == rotated


class Rope(torch.nn.Module):
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)


def _qk_cos_sin(b: int = 2, n: int = 3, s: int = 5, d: int = 8, interleaved_halves: bool = True):
    q, k = torch.randn(b, n, s, d), torch.randn(b, n, s, d)
    freqs = torch.randn(b, s, d // 2)
    emb = torch.cat([freqs, freqs], -1)
    return q, k, emb.cos(), emb.sin()


def test_explicit_module_and_dtype() -> None:
    args = _qk_cos_sin()
    gm = export_fn(Rope(), *args)
    gm, n = run(gm)
    assert n == 1
    node = next(n for n in gm.graph.nodes if n.target == ad.torch_rope_with_explicit_cos_sin.default)
    assert node.args[4] == 1
    ref = Rope()(*args)
    for a, b in zip(gm(*args), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class WrongSplit(torch.nn.Module):
    """Not rotate_half: the halves are split unevenly, so it must stay as it is."""

    def forward(self, q, cos, sin):
        rot = torch.cat((-q[..., 3:], q[..., :3]), dim=-1)
        return q * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


def test_uneven_split_is_left_alone() -> None:
    q, _, cos, sin = _qk_cos_sin()
    gm = export_fn(WrongSplit(), q, cos, sin)
    gm, n = run(gm)
    assert n == 0 and count_op(gm, aten.neg) == 1
    torch.testing.assert_close(gm(q, cos, sin), WrongSplit()(q, cos, sin))


class QOnly(torch.nn.Module):
    """A single rotated tensor (no k partner) still gets the op, with x passed as q and k."""

    def forward(self, q, cos, sin):
        rot = torch.cat((-q[..., 4:], q[..., :4]), dim=-1)
        return q * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


def test_unpaired_rotation() -> None:
    q, _, cos, sin = _qk_cos_sin()
    gm = export_fn(QOnly(), q, cos, sin)
    gm, n = run(gm)
    assert n == 1 and count_op(gm, aten.neg) == 0
    torch.testing.assert_close(gm(q, cos, sin), QOnly()(q, cos, sin), rtol=0, atol=0)


class Interleaved(torch.nn.Module):
    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb_interleave(q, k, cos, sin)


def test_deepseek_interleaved() -> None:
    args = _qk_cos_sin()
    gm = export_fn(Interleaved(), *args)
    gm, n = run(gm)
    assert n == 1
    assert count_op(gm, ad.torch_rope_with_qk_interleaving) == 1
    assert count_op(gm, aten.sub) == 0
    for a, b in zip(gm(*args), Interleaved()(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


class DeInterleaveThenRotateHalf(torch.nn.Module):
    """The older DeepSeek form: de-interleave with view/transpose/reshape, then HF rotate-half."""

    def forward(self, q, k, cos, sin):
        b, h, s, d = q.shape
        q = q.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
        k = k.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)
        return apply_rotary_pos_emb(q, k, cos, sin)


def test_deinterleave_view_form() -> None:
    args = _qk_cos_sin()
    gm = export_fn(DeInterleaveThenRotateHalf(), *args)
    gm, n = run(gm)
    # The de-interleaving reshape stays; the rotation itself is the canonical op.
    assert n == 1 and count_op(gm, ad.torch_rope_with_explicit_cos_sin) == 1
    for a, b in zip(gm(*args), DeInterleaveThenRotateHalf()(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class Complex(torch.nn.Module):
    def forward(self, q, k, freqs):
        return apply_rotary_emb(q, k, freqs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama4_complex(dtype: torch.dtype) -> None:
    q, k = torch.randn(2, 5, 3, 8, dtype=dtype), torch.randn(2, 5, 4, 8, dtype=dtype)
    freqs = torch.polar(torch.ones(2, 5, 4), torch.randn(2, 5, 4))
    gm = export_fn(Complex(), q, k, freqs)
    gm, n = run(gm)
    assert n == 1
    assert count_op(gm, ad.torch_rope_with_complex_freqs) == 1
    assert count_op(gm, aten.view_as_complex) == 0
    for a, b in zip(gm(q, k, freqs), Complex()(q, k, freqs)):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)
