"""resize_kv_cache: skipped on a CPU; grows the cache into free memory on a GPU, measuring with state rows."""

import copy

import pytest
import torch
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_runtime.kv_cache.interface import CachedSequenceInterface
from ad_runtime.transform.library.resize_kv_cache import _largest_batch
from cached_attention_models import export_tiny
from cached_ssm_models import TinyMambaModel
from tiny_llama import build_cached, export_with_attention_ops, greedy_cached, greedy_reference, tiny_llama


@pytest.fixture(scope="module")
def graph():
    return export_with_attention_ops(tiny_llama())


def test_the_measured_batch_gives_each_sequence_a_state_row():
    # A hybrid (Mamba2 + attention) graph refuses a step whose sequences lack a state row: the batch that measures
    # activations on a GPU failed falcon_h1's and lfm2's builds there before each sequence got one.
    torch.manual_seed(0)
    cm = CachedSequenceInterface(max_batch_size=3, max_seq_len=8, page_size=4, max_num_tokens=20)
    InferenceOptimizer(None, {"insert_cached_ssm_attention": {}, "insert_cached_causal_conv": {},
                              "initialize_cache": {}})(cm=cm, mod=export_tiny(TinyMambaModel(n_layers=1).eval()))
    batch = _largest_batch(cm)
    assert sorted(s.slot for s in batch) == [0, 1, 2] and sum(len(s.token_ids) for s in batch) == 20
    cm.update(batch)


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
