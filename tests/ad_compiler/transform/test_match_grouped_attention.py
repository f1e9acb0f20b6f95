"""match_grouped_attention: torch_attention gets n_kv-head k/v instead of repeat_kv'd ones."""

import pytest
import torch
from attention_graphs import N_KV, apply, assert_same_outputs, attention_nodes, exported, outputs, run

from ad_compiler.transform.attention_utils import attention_args
from ad_compiler.utils.graph_utils import count_op

aten = torch.ops.aten


@pytest.mark.parametrize("with_marker", [True, False])  # match_repeat_kv's marker, or the raw expand/reshape
def test_llama_repeat_kv_removed(with_marker: bool):
    gm = exported("llama", patched=False)
    ref = outputs(gm)
    gm = run((["match_repeat_kv"] if with_marker else []) + ["match_sdpa_to_torch_attention"], gm)
    assert all(attention_args(n)["key"].meta["val"].shape[1] == 2 * N_KV for n in attention_nodes(gm))
    gm, info = apply("match_grouped_attention", gm)
    assert info.num_matches == 2
    for a in map(attention_args, attention_nodes(gm)):
        assert a["key"].meta["val"].shape[1] == N_KV and a["value"].meta["val"].shape[1] == N_KV
    assert count_op(gm, aten.repeat_interleave) == 0
    assert not any(n.target == aten.expand.default and n.meta["val"].dim() == 5 for n in gm.graph.nodes)
    assert_same_outputs(ref, gm)


def test_gemma2_eager_repeat_kv_removed():
    gm = exported("gemma2")
    ref = outputs(gm)
    gm, info = apply("match_grouped_attention", run(["match_repeat_kv", "match_eager_attention"], gm))
    assert info.num_matches == 2
    assert all(attention_args(n)["key"].meta["val"].shape[1] == N_KV for n in attention_nodes(gm))
    assert_same_outputs(ref, gm)


def test_already_grouped_no_match():
    gm = run(["match_sdpa_to_torch_attention"], exported("llama"))  # export patch: enable_gqa, no repeat_kv
    gm, info = apply("match_grouped_attention", gm)
    assert info.num_matches == 0
