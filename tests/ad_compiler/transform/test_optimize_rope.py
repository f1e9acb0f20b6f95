"""optimize_rope: per-forward cos/sin become one precomputed table read by the cached rope kernel."""

import pytest
import torch
from ad_compiler.errors import MissingBackendError
from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.kernels_registry import _BACKENDS
from ad_compiler.transform.interface import SharedConfig, TransformRegistry
from ad_compiler.utils.graph_utils import count_op
from torch.fx import GraphModule
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
from hf_logits import Logits

aten = torch.ops.aten
ad = torch.ops.auto_deploy
SMALL = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=128, head_dim=16)
D = torch.export.Dim.DYNAMIC
MAX_POS = 64


def matched(config, dtype: torch.dtype) -> GraphModule:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval().to(dtype)
    inputs = dict(input_ids=torch.randint(0, 128, (2, 7)), position_ids=torch.arange(7).expand(2, 7))
    gm = torch_export_to_gm(Logits(model), (), inputs, dynamic_shapes={k: {0: D, 1: D} for k in inputs})
    return TransformRegistry.get("match_rope_pattern")()(gm, None, None, SharedConfig())


def optimize(gm: GraphModule, **config) -> tuple[GraphModule, int]:
    shared = SharedConfig(extras={"max_seq_len": MAX_POS})
    gm = TransformRegistry.get("optimize_rope")(config)(gm, None, None, shared)
    return gm, gm._transform_history["optimize_rope"].num_matches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "config",
    [LlamaConfig(**SMALL), Phi3Config(**SMALL, partial_rotary_factor=0.5, pad_token_id=0)],
    ids=["llama", "phi3-partial"],
)
def test_cached_table_equals_graph(config, dtype: torch.dtype) -> None:
    gm = matched(config, dtype)
    # Positions that are not 0..s-1 and differ per sequence, as at run time with a KV cache.
    cases = [
        dict(input_ids=torch.randint(0, 128, (2, 5)), position_ids=torch.tensor([[9, 10, 11, 12, 13], [40, 41, 42, 43, 44]])),
        dict(input_ids=torch.randint(0, 128, (1, 3)), position_ids=torch.tensor([[MAX_POS - 3, MAX_POS - 2, MAX_POS - 1]])),
    ]
    refs = [gm(**c) for c in cases]
    assert count_op(gm, aten.cos) == 1  # the rotary embedding computes cos/sin once per forward
    keys = set(gm.state_dict())
    gm, n = optimize(gm, backend="torch")
    assert n == 2
    # torch backend: the table is read once per forward, each layer rotates with the rows it read
    assert count_op(gm, ad.torch_cos_sin_table_lookup) == 1
    assert count_op(gm, ad.torch_rope_with_explicit_cos_sin) == 2
    assert count_op(gm, aten.cos) == 0 and count_op(gm, aten.sin) == 0
    table = gm.rope_cos_sin_cache_0
    rotary = int(16 * getattr(config, "partial_rotary_factor", 1.0))
    assert table.shape == (MAX_POS, rotary) and table.dtype == dtype
    assert set(gm.state_dict()) == keys  # non-persistent: checkpoint keys unchanged
    for c, ref in zip(cases, refs):
        torch.testing.assert_close(gm(**c), ref, rtol=0, atol=0)


class ExternalCosSin(torch.nn.Module):
    """cos/sin are graph inputs, not a function of positions: nothing to precompute."""

    def forward(self, q, k, cos, sin):
        return apply_rotary_pos_emb(q, k, cos, sin)


def test_cos_sin_not_from_positions_is_left_alone() -> None:
    args = (torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))
    gm = torch_export_to_gm(ExternalCosSin(), args)
    gm = TransformRegistry.get("match_rope_pattern")()(gm, None, None, SharedConfig())
    assert count_op(gm, ad.torch_rope_with_explicit_cos_sin) == 1
    gm, n = optimize(gm, backend="torch")
    assert n == 0 and count_op(gm, ad.torch_rope_with_explicit_cos_sin) == 1
    for a, b in zip(gm(*args), ExternalCosSin()(*args)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(_BACKENDS["rope"].entries, "triton", raising=False)
    gm = matched(LlamaConfig(**SMALL), torch.float32)
    with pytest.raises(MissingBackendError, match="ad-runtime"):
        optimize(gm, backend="triton")
