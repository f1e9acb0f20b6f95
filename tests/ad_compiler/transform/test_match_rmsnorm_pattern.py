"""match_rmsnorm_pattern: HF RMSNorm variants become torch_rmsnorm, bit-equal in fp32 and bf16."""

import pytest
import torch
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.transform.interface import SharedConfig, TransformRegistry
from ad_compiler.utils.graph_utils import count_op
from torch.fx import GraphModule
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, Qwen3Config
from hf_logits import Logits

aten = torch.ops.aten
ad = torch.ops.auto_deploy
SMALL = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=128, head_dim=16)
D = torch.export.Dim.DYNAMIC


def run(gm: GraphModule) -> tuple[GraphModule, int]:
    gm = TransformRegistry.get("match_rmsnorm_pattern")()(gm, None, None, SharedConfig())
    return gm, gm._transform_history["match_rmsnorm_pattern"].num_matches


# (config, norms per model): Llama 2 per layer + final; Qwen3 adds q/k-norm; Gemma2 4 per layer; Gemma3 4 + q/k.
CASES = [
    (LlamaConfig(**SMALL), 5),
    (Qwen3Config(**SMALL), 9),
    (Gemma2Config(**SMALL), 9),
    (Gemma3TextConfig(**SMALL), 13),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("config", "expected"), CASES, ids=["llama", "qwen3", "gemma2", "gemma3"])
def test_hf_norms(config, expected: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # Gemma's norm weights start at zero: make (1 + w) matter
    inputs = dict(input_ids=torch.randint(0, 128, (2, 7)), position_ids=torch.arange(7).expand(2, 7))
    gm = torch_export_to_gm(Logits(model), (), inputs, dynamic_shapes={k: {0: D, 1: D} for k in inputs})
    ref = gm(**inputs)
    assert count_op(gm, aten.rsqrt) == expected
    gm, n = run(gm)
    assert n == expected
    assert count_op(gm, ad.torch_rmsnorm) == expected
    assert count_op(gm, aten.rsqrt) == 0
    out = gm(**inputs)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


class Norms(torch.nn.Module):
    """One matching norm and two look-alikes that are not HF RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8))

    @staticmethod
    def _norm(x: torch.Tensor, dim: int) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(dim, keepdim=True) + 1e-5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        good = self.w * self._norm(x, -1).to(x.dtype)
        over_seq = self.w * self._norm(x, 1).to(x.dtype)  # mean over the wrong dim
        other_dtype = self.w * self._norm(x, -1).to(torch.float16)  # cast back to another dtype
        return good, over_seq, other_dtype


def test_only_true_rmsnorm_matches() -> None:
    x = torch.randn(2, 8, 8, dtype=torch.bfloat16)
    gm = torch_export_to_gm(Norms(), (x,), dynamic_shapes=({0: D},))
    ref = gm(x)
    gm, n = run(gm)
    assert n == 1
    assert count_op(gm, aten.rsqrt) == 2
    node = next(iter(gm.graph.find_nodes(op="call_function", target=ad.torch_rmsnorm.default)))
    assert node.args[2] == pytest.approx(1e-5)
    for a, b in zip(gm(x), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
