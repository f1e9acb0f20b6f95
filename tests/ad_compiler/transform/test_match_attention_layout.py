"""match_attention_layout: torch_attention switched to the configured layout with transposes around it."""

import pytest
import torch
from attention_graphs import N_HEADS, N_KV, apply, assert_same_outputs, attention_nodes, exported, outputs, run

from ad_compiler.transform.attention_utils import attention_args
from ad_compiler.utils.graph_utils import count_op

aten = torch.ops.aten


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_to_bsnd(family: str):
    gm = run(["match_eager_attention", "match_sdpa_to_torch_attention"], exported(family))
    ref = outputs(gm)
    n_transpose = count_op(gm, aten.transpose)
    gm, info = apply("match_attention_layout", gm, attn_layout="bsnd")
    assert info.num_matches == 2
    assert count_op(gm, aten.transpose) == n_transpose + 2 * 4  # q, k, v in and the output back
    for a in map(attention_args, attention_nodes(gm)):
        assert a["layout"] == "bsnd"
        assert a["query"].meta["val"].shape[2] == N_HEADS and a["key"].meta["val"].shape[2] in (N_KV, N_HEADS)
    assert_same_outputs(ref, gm)

    gm, info = apply("match_attention_layout", gm, attn_layout="bsnd")  # idempotent
    assert info.num_matches == 0


def test_bnsd_keeps_graph():
    gm = run(["match_sdpa_to_torch_attention"], exported("llama"))
    n_transpose = count_op(gm, aten.transpose)
    gm, info = apply("match_attention_layout", gm, attn_layout="bnsd")
    assert info.num_matches == 0 and count_op(gm, aten.transpose) == n_transpose
