"""match_repeat_kv: HF repeat_kv subgraphs become one repeat_interleave marker, values unchanged."""

import torch
import torch.nn as nn
from attention_graphs import apply, assert_same_outputs, exported, outputs

from ad_compiler.export.export import torch_export_to_gm
from ad_compiler.utils.graph_utils import count_op

aten = torch.ops.aten


def test_llama_repeat_kv_becomes_repeat_interleave():
    gm = exported("llama", patched=False)  # unpatched sdpa gets repeat_kv'd k and v
    ref = outputs(gm)
    n_expand = count_op(gm, aten.expand)
    assert count_op(gm, aten.repeat_interleave) == 0
    gm, info = apply("match_repeat_kv", gm)
    assert info.num_matches == 4  # k and v of 2 layers
    markers = [n for n in gm.graph.nodes if n.target == aten.repeat_interleave.self_int]
    assert len(markers) == 4 and all(n.args[1:] == (2, 1) for n in markers)  # n_rep = 4 heads / 2 kv heads
    assert count_op(gm, aten.expand) == n_expand - 4
    assert_same_outputs(ref, gm)


def test_no_repeat_kv_no_match():
    gm = exported("llama")  # the sdpa export patch passes n_kv heads with enable_gqa
    ref = outputs(gm)
    gm, info = apply("match_repeat_kv", gm)
    assert info.num_matches == 0 and count_op(gm, aten.repeat_interleave) == 0
    assert_same_outputs(ref, gm)


class _NotRepeatKv(nn.Module):
    """expand + reshape that tiles along the sequence (unsqueeze at dim 3), which is not repeat_kv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, s, d = x.shape
        return x[:, :, :, None, :].expand(b, n, s, 2, d).reshape(b, n, s * 2, d)


def test_other_expand_reshape_untouched():
    x = torch.randn(2, 3, 5, 4)
    gm = torch_export_to_gm(_NotRepeatKv(), (x,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    gm, info = apply("match_repeat_kv", gm)
    assert info.num_matches == 0
    torch.testing.assert_close(gm(x), _NotRepeatKv()(x))
