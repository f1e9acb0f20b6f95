"""The attention transforms in default.yaml order: each layer ends as one bsnd GQA torch_attention."""

import pytest
import torch
from attention_graphs import (
    CHAIN,
    N_HEADS,
    N_KV,
    N_LAYERS,
    WINDOW,
    assert_same_outputs,
    attention_nodes,
    exported,
    hf_outputs,
    run,
    sdpa,
)
from ad_config.transform_config import parse_transforms

from ad_compiler.transform.attention_utils import attention_args
from ad_compiler.utils.graph_utils import count_op

aten = torch.ops.aten
EXPECTED = {  # family -> (sliding_window, logit_cap) per layer
    "llama": [(None, None)] * N_LAYERS,
    "mistral": [(WINDOW, None)] * N_LAYERS,
    "gemma2": [(WINDOW, 2.0), (None, 2.0)],
}


def test_chain_is_default_yaml_order():
    from importlib.resources import files

    import yaml

    names = list(yaml.safe_load(files("ad_config").joinpath("default.yaml").read_text())["transforms"])
    parse_transforms({n: {} for n in CHAIN})  # every name is a known transform
    assert [n for n in names if n in CHAIN] == CHAIN


@pytest.mark.parametrize("family", sorted(EXPECTED))
@pytest.mark.parametrize("patched", [True, False])
def test_chain(family: str, patched: bool):
    gm = run(CHAIN, exported(family, patched))
    assert count_op(gm, sdpa) == 0 and count_op(gm, aten.softmax) == 0 and count_op(gm, aten._softmax) == 0
    nodes = attention_nodes(gm)
    assert len(nodes) == N_LAYERS
    got = []
    for a in map(attention_args, nodes):
        assert a["layout"] == "bsnd" and a["attn_mask"] is None and a["is_causal"]
        assert a["query"].meta["val"].shape[2] == N_HEADS
        assert a["key"].meta["val"].shape[2] == N_KV and a["value"].meta["val"].shape[2] == N_KV
        got.append((a["sliding_window"], a["logit_cap"]))
    assert got == EXPECTED[family]
    # Against Hugging Face itself: the patched sdpa graph alone would miss Mistral's window.
    assert_same_outputs(hf_outputs(family), gm, atol=1e-4)
