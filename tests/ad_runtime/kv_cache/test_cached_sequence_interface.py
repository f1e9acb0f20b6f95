"""CachedSequenceInterface: the executor-facing step API."""

import pytest
import torch
from ad_runtime.attention import CacheSpec
from ad_runtime.kv_cache.interface import CachedSequenceInterface, StepSequence, parse_kv_cache_dtype


def _cm() -> CachedSequenceInterface:
    cm = CachedSequenceInterface(max_batch_size=2, max_seq_len=16, page_size=4, num_pages=5)
    cm.add_cache("k_cache_0", CacheSpec(2, 8, torch.float32))
    cm.add_metadata("page_table")
    cm.add_metadata("seq_len")
    return cm


def test_named_args_follow_registered_inputs():
    cm = _cm()
    with pytest.raises(RuntimeError, match="initialize_cache"):
        cm.update([StepSequence([1, 2], 0, [0])])
        _ = cm.named_args
    cm.initialize_caches()
    cm.pool.ensure_capacity("x", 6)
    cm.update([StepSequence([5, 6, 7], 3, cm.pool.page_table("x"))])
    args = cm.named_args
    assert list(args) == ["input_ids", "position_ids", "page_table", "seq_len", "k_cache_0"]
    assert args["position_ids"].tolist() == [[3, 4, 5]]
    assert args["k_cache_0"].shape == (6, 4, 2, 8)
    assert cm.info.last_token_idx.tolist() == [2]


def test_kv_cache_dtype_names():
    assert parse_kv_cache_dtype("auto") is None
    assert parse_kv_cache_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        parse_kv_cache_dtype("int3")


def test_host_prepare_hooks_run_on_update():
    cm = _cm()
    cm.initialize_caches()
    seen = []

    class Hook:
        @classmethod
        def host_prepare(cls, info):
            seen.append(info.num_tokens)

        @classmethod
        def on_cache_init(cls, caches):
            seen.append(len(caches))

    cm.add_attention_backend(Hook)
    cm.initialize_caches()
    cm.update([StepSequence([1], 0, [0])])
    assert seen == [1, 1]
