"""match_sdpa_to_torch_attention: sdpa becomes torch_attention; transformers' causal masks become is_causal."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from attention_graphs import (
    WINDOW,
    apply,
    assert_same_outputs,
    attention_nodes,
    exported,
    hf_outputs,
    outputs,
    sdpa,
    set_attention_arg,
)

from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.transform.attention_utils import attention_args
from ad_compiler.utils.graph_utils import count_op


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("patched", [True, False])
def test_causal_models(family: str, patched: bool):
    gm = exported(family, patched)
    ref = outputs(gm)
    gm, info = apply("match_sdpa_to_torch_attention", gm)
    assert info.num_matches == 2 and count_op(gm, sdpa) == 0
    for a in map(attention_args, attention_nodes(gm)):
        # Unpatched, the mask (causal & packed-sequence) is recognised and dropped.
        assert a["attn_mask"] is None and a["is_causal"] and a["sliding_window"] is None
        assert a["scale"] == 0.25 and a["layout"] == "bnsd"
    assert_same_outputs(ref, gm)


def test_mistral_window_read_from_mask():
    gm = exported("mistral", patched=False)
    ref = outputs(gm)
    gm, info = apply("match_sdpa_to_torch_attention", gm)
    assert info.num_matches == 2
    assert [(a["attn_mask"], a["is_causal"], a["sliding_window"]) for a in map(attention_args, attention_nodes(gm))] == [
        (None, True, WINDOW)
    ] * 2
    assert_same_outputs(ref, gm)
    set_attention_arg(gm, 8, None)  # the window matters for these inputs, so losing it would be caught
    with pytest.raises(AssertionError):
        assert_same_outputs(ref, gm)


def test_mistral_window_read_from_export_patch_meta():
    gm = exported("mistral")  # sdpa(is_causal=True) without a mask; the window travels in node meta
    gm, info = apply("match_sdpa_to_torch_attention", gm)
    assert info.num_matches == 2
    assert [attention_args(n)["sliding_window"] for n in attention_nodes(gm)] == [WINDOW] * 2
    assert_same_outputs(hf_outputs("mistral"), gm, atol=1e-4)


class _SdpaWithMask(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.1)


def test_caller_mask_is_kept():
    q, k, v = (torch.randn(2, 4, 6, 16) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True
    gm = torch_export_to_gm(_SdpaWithMask(), (q, k, v, mask), dynamic_shapes=None)
    gm, info = apply("match_sdpa_to_torch_attention", gm)
    assert info.num_matches == 1
    (a,) = map(attention_args, attention_nodes(gm))
    assert a["attn_mask"] is not None and a["is_causal"] is False and a["scale"] == 0.1
    torch.testing.assert_close(gm(q, k, v, mask), _SdpaWithMask()(q, k, v, mask))
