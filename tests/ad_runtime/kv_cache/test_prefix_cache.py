"""Prefix cache bookkeeping: the page key chain, shared pages by reference count, LRU eviction only when pages run out."""

import pytest
from ad_runtime.kv_cache.page_pool import OutOfPagesError, PagePool
from ad_runtime.kv_cache.prefix_cache import ROOT_HASH, PrefixCacheStats, page_hash


def _keys(tokens: list[int], page: int) -> list[bytes]:
    keys: list[bytes] = []
    for i in range(len(tokens) // page):
        keys.append(page_hash(keys[-1] if keys else ROOT_HASH, tokens[i * page : (i + 1) * page]))
    return keys


def test_a_page_key_names_the_whole_prefix_and_anything_else_that_changes_it():
    a, b = page_hash(ROOT_HASH, [1, 2]), page_hash(ROOT_HASH, [3, 4])
    assert page_hash(a, [5, 6]) == page_hash(a, [5, 6])  # deterministic
    assert page_hash(a, [5, 6]) != page_hash(b, [5, 6])  # same tokens after another prefix
    assert page_hash(a, [5, 6]) != page_hash(a, [6, 5])
    assert page_hash(a, [5, 6], extra=b"adapter-1") != page_hash(a, [5, 6])
    assert PrefixCacheStats(queried_tokens=8, hit_tokens=6).hit_rate == 0.75 and PrefixCacheStats().hit_rate == 0.0


def test_shared_pages_are_counted_and_return_to_the_pool_when_the_last_holder_goes():
    pool = PagePool(8, 2)
    keys = _keys([1, 2, 3, 4, 5], 2)
    pool.ensure_capacity("a", 5)  # pages 0, 1, 2
    pool.cache_pages("a", keys, 2)  # the two full pages
    assert pool.match(keys) == [0, 1] and pool.num_free_pages == 5
    pool.attach("b", pool.match(keys))
    pool.ensure_capacity("b", 6)
    assert pool.page_table("b") == [0, 1, 3]
    assert [pool.cache.refcount(p) for p in range(4)] == [2, 2, 1, 1]
    assert pool.num_free_pages == 4  # shared pages are counted once
    assert pool.free("a") == 3 and pool.num_free_pages == 5  # page 2 was a's alone; 0 and 1 are b's too
    assert pool.free("b") == 3 and pool.num_free_pages == 8  # cached pages nobody holds count as free
    assert pool.cache.num_evictable == 2 and pool.match(keys) == [0, 1]
    pool.ensure_capacity("c", 1)
    with pytest.raises(ValueError, match="already holds pages"):
        pool.attach("c", [0])  # cached pages start a page table, never extend one


def test_a_second_copy_of_a_cached_page_stays_private():
    pool = PagePool(4, 2)
    keys = _keys([7, 8], 2)
    pool.ensure_capacity("a", 2)
    pool.ensure_capacity("b", 2)
    pool.cache_pages("a", keys, 1)
    pool.cache_pages("b", keys, 1)  # computed the same page at the same time: a's copy is the cached one
    assert pool.match(keys) == [0]
    pool.free("b")
    assert pool.cache.num_evictable == 0 and pool.num_free_pages == 3  # b's page went straight back
    pool.free("a")
    assert pool.cache.num_evictable == 1 and pool.num_free_pages == 4


def test_cached_pages_are_evicted_least_recently_released_first_and_only_when_free_pages_run_out():
    pool = PagePool(4, 2)
    ka, kb = _keys([1, 2, 3, 4], 2), _keys([5, 6], 2)
    pool.ensure_capacity("a", 4)  # pages 0, 1
    pool.cache_pages("a", ka, 2)
    pool.free("a")
    pool.ensure_capacity("b", 2)  # page 2: a free page, no eviction
    pool.cache_pages("b", kb, 1)
    pool.free("b")
    assert pool.cache.num_evictions == 0 and pool.match(ka) == [0, 1] and pool.match(kb) == [2]
    pool.ensure_capacity("c", 4)  # page 3, then one eviction: a's last page (released before a's first)
    assert pool.cache.num_evictions == 1 and pool.match(ka) == [0] and pool.match(kb) == [2]
    pool.attach("d", pool.match(kb))  # b's page is used again: no longer the next to go
    pool.ensure_capacity("e", 2)
    assert pool.match(ka) == [] and pool.match(kb) == [2]
    with pytest.raises(OutOfPagesError):
        pool.ensure_capacity("f", 2)  # every page is held now
    for s in ("c", "d", "e"):
        pool.free(s)
    assert pool.num_free_pages == 4 and not pool.seq_ids()
    assert all(pool.cache.refcount(p) == 0 for p in range(4))
