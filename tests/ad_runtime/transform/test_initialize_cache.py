"""initialize_cache: allocates one paged cache per registered spec, honouring kv_cache_dtype."""

import pytest
import torch
from ad_compiler.errors import CompileError
from ad_compiler.transform.optimizer import InferenceOptimizer
from ad_runtime.attention import CacheSpec
from ad_runtime.kv_cache.interface import CachedSequenceInterface
from ad_runtime.memory_plan import first_kv_pages
from ad_runtime.transform.library import initialize_cache
from cached_attention_models import TinyAttentionModel, export_tiny

import ad_runtime  # noqa: F401


@pytest.mark.parametrize("kv_dtype, expect", [("auto", torch.float32), ("bfloat16", torch.bfloat16),
                                              ("fp8", torch.float8_e4m3fn)])
def test_allocates_caches_in_dtype(kv_dtype, expect):
    cm = CachedSequenceInterface(max_batch_size=2, max_seq_len=10, page_size=4, kv_cache_dtype=kv_dtype)
    opt = InferenceOptimizer(None, {"insert_cached_attention": {"backend": "torch"}, "initialize_cache": {}})
    opt(cm=cm, mod=export_tiny(TinyAttentionModel(n_layers=2)))
    assert opt.history["initialize_cache"].num_matches == 4
    assert cm.num_pages == 2 * 3  # default: every sequence can reach max_seq_len
    assert sorted(cm.caches) == ["k_cache_0", "k_cache_1", "v_cache_0", "v_cache_1"]
    for t in cm.caches.values():
        assert t.shape == (7, 4, 2, 8) and t.dtype == expect  # + 1 scratch page
    assert cm.bytes_per_page() == 4 * 4 * 2 * 8 * expect.itemsize
    assert cm.pool.num_free_pages == 6 and cm.info.scratch_page == 6


def test_skips_without_specs_and_reallocates():
    cm = CachedSequenceInterface(max_batch_size=1, max_seq_len=8, page_size=4)
    opt = InferenceOptimizer(None, {"initialize_cache": {}})
    opt(cm=cm, mod=torch.nn.Module())
    assert opt.history["initialize_cache"].skipped
    cm.add_cache("k_cache_0", CacheSpec(n_kv_heads=1, head_dim=2, dtype=torch.float16))
    cm.initialize_caches()
    cm.pool.ensure_capacity("a", 5)
    nbytes = cm.initialize_caches(num_pages=9)
    assert nbytes == 10 * 4 * 1 * 2 * 2
    assert cm.pool.num_free_pages == 9  # re-allocation resets the pool


def test_first_allocation_fits_in_half_the_free_memory():
    # 1 MiB pages, 100 MiB free: 50 MiB for the first allocation, one of them the scratch page
    mib = 2**20
    assert first_kv_pages(configured=40, bytes_per_page=mib, free_bytes=100 * mib) == 40
    assert first_kv_pages(configured=4096, bytes_per_page=mib, free_bytes=100 * mib) == 49
    assert first_kv_pages(configured=4096, bytes_per_page=mib, free_bytes=mib) == 0


def _cm(max_batch_size: int, max_seq_len: int) -> CachedSequenceInterface:
    cm = CachedSequenceInterface(max_batch_size=max_batch_size, max_seq_len=max_seq_len, page_size=4)
    cm.add_cache("k_cache_0", CacheSpec(n_kv_heads=1, head_dim=64, dtype=torch.float32))  # 1 KiB a page
    return cm


def test_a_cpu_cache_larger_than_memory_gets_half_of_it_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(initialize_cache, "device_free_bytes", lambda device: 100 * 2**10)  # 100 KiB free
    cm = _cm(max_batch_size=64, max_seq_len=16)  # 256 pages of 1 KiB configured
    opt = InferenceOptimizer(None, {"initialize_cache": {}})
    opt(cm=cm, mod=torch.nn.Module())
    assert cm.num_pages == 49 and cm.caches["k_cache_0"].shape[0] == 50
    assert "requests wait for pages" in caplog.text
    small = _cm(max_batch_size=2, max_seq_len=16)  # 8 pages fit: allocated as configured, no warning
    caplog.clear()
    InferenceOptimizer(None, {"initialize_cache": {}})(cm=small, mod=torch.nn.Module())
    assert small.num_pages == 8 and "requests wait" not in caplog.text


def test_not_one_sequence_fitting_is_an_error_naming_max_seq_len(monkeypatch):
    monkeypatch.setattr(initialize_cache, "device_free_bytes", lambda device: 10 * 2**10)  # 4 pages fit
    with pytest.raises(CompileError, match="max_seq_len"):
        InferenceOptimizer(None, {"initialize_cache": {}})(cm=_cm(max_batch_size=4, max_seq_len=64),
                                                            mod=torch.nn.Module())
