"""resize_kv_cache: skipped on a CPU; on a GPU the cache grows into free memory."""

import copy

import pytest
import torch
from tiny_llama import build_cached, export_with_attention_ops, greedy_cached, greedy_reference, tiny_llama


@pytest.fixture(scope="module")
def graph():
    return export_with_attention_ops(tiny_llama())


def test_skipped_on_cpu(graph):
    _, cm, hist = build_cached(copy.deepcopy(graph), resize_kv_cache={"free_mem_ratio": 0.5})
    info = hist["resize_kv_cache"]
    assert info.skipped and "CUDA" in info.reason
    assert cm.num_pages == 4 * 12  # unchanged default


@pytest.mark.gpu
def test_grows_cache_into_free_memory():
    model = tiny_llama(device="cuda")
    gm = export_with_attention_ops(model)
    mod, cm, hist = build_cached(gm, device="cuda", resize_kv_cache={"free_mem_ratio": 0.1})
    assert hist["resize_kv_cache"].num_matches == 1, hist["resize_kv_cache"]
    free, _ = torch.cuda.mem_get_info()
    assert cm.num_pages > 4 * 12
    cache_bytes = sum(t.numel() * t.element_size() for t in cm.caches.values())
    assert cache_bytes > 0.05 * (free + cache_bytes)  # roughly the ratio asked for, not a token amount
    assert cm.pool.num_free_pages == cm.num_pages
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    tokens, _ = greedy_cached(mod, cm, prompts, steps=4)
    assert tokens == greedy_reference(model, prompts, steps=4)
