"""match_eager_attention: eager softmax attention (soft-cap, sliding window) becomes one torch_attention."""

import pytest
import torch
import torch.nn as nn
from attention_graphs import WINDOW, apply, assert_same_outputs, attention_nodes, exported, outputs, set_attention_arg

from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.transform.attention_utils import attention_args
from ad_compiler.utils.graph_utils import count_op

aten = torch.ops.aten


@pytest.mark.parametrize("patched", [True, False])
def test_gemma2_softcap_and_window(patched: bool):
    gm = exported("gemma2", patched)  # eager either way: the mask patch only drops packed-sequence detection
    ref = outputs(gm)
    assert count_op(gm, aten.softmax) == 2 and count_op(gm, aten.tanh) == 2
    gm, info = apply("match_eager_attention", gm)
    assert info.num_matches == 2
    assert count_op(gm, aten.softmax) == 0 and count_op(gm, aten.tanh) == 0 and count_op(gm, aten.dropout) == 0
    args = [attention_args(n) for n in attention_nodes(gm)]
    assert [a["sliding_window"] for a in args] == [WINDOW, None]  # Gemma 2 layers alternate sliding/global
    assert all(a["logit_cap"] == 2.0 and a["scale"] == 0.25 and a["attn_mask"] is None for a in args)
    assert all(a["is_causal"] and a["layout"] == "bnsd" for a in args)
    assert_same_outputs(ref, gm)

    set_attention_arg(gm, 9, None)  # without the soft-cap the logits change: the comparison above can fail
    with pytest.raises(AssertionError):
        assert_same_outputs(ref, gm)


class _EagerWithMask(nn.Module):
    """Eager attention with a caller-provided additive mask (nothing provably causal about it)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        w = torch.matmul(q, k.transpose(2, 3)) / 8.0 + mask
        p = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v)


def test_unknown_mask_is_kept():
    q, k, v = (torch.randn(2, 4, 6, 16) for _ in range(3))
    mask = torch.where(torch.rand(2, 1, 6, 6) > 0.3, 0.0, float("-inf"))
    mask[..., 0] = 0.0  # every row sees a key
    dyn = torch.export.Dim.DYNAMIC
    gm = torch_export_to_gm(_EagerWithMask(), (q, k, v, mask), dynamic_shapes=({0: dyn},) * 3 + ({0: dyn},))
    gm, info = apply("match_eager_attention", gm)
    assert info.num_matches == 1 and count_op(gm, aten.softmax) == 0
    (a,) = [attention_args(n) for n in attention_nodes(gm)]
    assert a["attn_mask"] is not None and a["is_causal"] is False and a["scale"] == 1 / 8.0
    torch.testing.assert_close(gm(q, k, v, mask), _EagerWithMask()(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_sdpa_models_untouched():
    gm = exported("llama")
    gm, info = apply("match_eager_attention", gm)
    assert info.num_matches == 0 and not attention_nodes(gm)
