"""End to end: a tiny random Llama with paged cached attention equals the full forward at every step."""

import copy

import pytest
import torch
from ad_compiler.utils.graph_utils import count_op
from tiny_llama import build_cached, export_with_attention_ops, greedy_cached, greedy_reference, tiny_llama


@pytest.fixture(scope="module")
def llama_and_graph():
    model = tiny_llama()
    gm = export_with_attention_ops(model)
    assert count_op(gm, torch.ops.auto_deploy.torch_attention) == 2
    return model, gm


@pytest.mark.parametrize("chunk", [None, 3])
def test_prefill_then_decode_matches_full_forward(llama_and_graph, chunk):
    model, gm = llama_and_graph
    mod, cm, hist = build_cached(copy.deepcopy(gm))  # transforms edit the graph in place
    assert hist["insert_cached_attention"].num_matches == 2
    prompts = [[3, 14, 15, 9, 2, 6, 5], [1, 7, 33], [42]]
    tokens, samples = greedy_cached(mod, cm, prompts, steps=5, chunk=chunk)
    assert len(samples) == 15
    for i, context, logits in samples:
        with torch.no_grad():
            ref = model(torch.tensor([context]), torch.arange(len(context))[None])[0, -1]
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    assert tokens == greedy_reference(model, prompts, steps=5)
    assert cm.pool.num_free_pages == cm.pool.num_pages
