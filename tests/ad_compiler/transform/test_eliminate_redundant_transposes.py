"""eliminate_redundant_transposes: cancelling transpose pairs and no-op contiguous calls disappear."""

import torch
import torch.nn as nn
from attention_graphs import apply, assert_same_outputs, attention_nodes, exported, outputs, run

from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.utils.graph_utils import count_op

aten = torch.ops.aten


class _Transposes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.transpose(1, 2)[:, :].transpose(-1, 1)  # cancels: dims {1, 2} both times, a full slice between
        b = x.transpose(0, 1).transpose(1, 2)  # different pairs: a real permutation, must stay
        return a * 2 + b.sum()


def test_small_module():
    x = torch.randn(2, 8, 8)
    m = _Transposes()
    gm = torch_export_to_gm(m, (x,))
    assert count_op(gm, aten.transpose) == 4
    gm, info = apply("eliminate_redundant_transposes", gm)
    assert info.num_matches == 1
    assert count_op(gm, aten.transpose) == 2
    torch.testing.assert_close(gm(x), m(x))


def test_gemma2_contiguous_after_attention():
    gm = run(["match_repeat_kv", "match_eager_attention", "match_grouped_attention", "match_attention_layout"], exported("gemma2"))
    ref = outputs(gm)
    # eager attention ends with `.transpose(1, 2).contiguous()`; once the transposes cancel it copies a contiguous tensor
    assert count_op(gm, aten.contiguous) == 2
    gm, info = apply("eliminate_redundant_transposes", gm)
    assert count_op(gm, aten.contiguous) == 0
    assert info.num_matches == 2 * 3  # per layer: the v pair, the output pair, the contiguous
    assert_same_outputs(ref, gm)


def test_llama_after_layout():
    gm = run(["match_repeat_kv", "match_sdpa_to_torch_attention", "match_grouped_attention"], exported("llama", False))
    gm = run(["match_attention_layout"], gm)
    ref = outputs(gm)
    n_transpose = count_op(gm, aten.transpose)
    gm, info = apply("eliminate_redundant_transposes", gm)
    # v: HF's transpose(1, 2) meets the layout's; the output: the layout's meets HF's transpose back.
    assert info.num_matches == 2 * 2
    assert count_op(gm, aten.transpose) < n_transpose
    for n in attention_nodes(gm):
        assert not any(u.target == aten.transpose.int for u in n.users)  # output feeds the o_proj reshape directly
    assert_same_outputs(ref, gm)
