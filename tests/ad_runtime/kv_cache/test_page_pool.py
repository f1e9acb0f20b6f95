"""PagePool bookkeeping: allocation, growth, freeing and the no-leak invariant."""

import pytest
from ad_runtime.kv_cache.page_pool import OutOfPagesError, PagePool


def test_allocate_grow_and_free():
    pool = PagePool(num_pages=8, page_size=4)
    assert pool.num_free_pages == 8
    assert pool.ensure_capacity("a", 5) == [0, 1]  # 5 tokens -> 2 pages
    assert pool.ensure_capacity("a", 8) == []  # still fits in 2 pages
    assert pool.ensure_capacity("a", 9) == [2]
    assert pool.page_table("a") == [0, 1, 2]
    assert pool.ensure_capacity("b", 1) == [3]
    assert pool.num_free_pages == 4 and pool.num_used_pages == 4
    assert pool.free("a") == 3
    assert pool.page_table("a") == [] and not pool.has("a")
    assert pool.num_free_pages == 7
    # Freed pages are reused, lowest first.
    assert pool.ensure_capacity("c", 12) == [0, 1, 2]


def test_can_allocate_counts_existing_pages():
    pool = PagePool(num_pages=3, page_size=2)
    assert pool.can_allocate(6)
    assert not pool.can_allocate(7)
    pool.ensure_capacity("a", 4)
    assert pool.can_allocate(6, seq_id="a")  # needs only one more
    assert not pool.can_allocate(4)  # a new sequence would need two
    assert pool.num_missing_pages(6, "a") == 1


def test_out_of_pages_leaves_state_unchanged():
    pool = PagePool(num_pages=2, page_size=2)
    pool.ensure_capacity("a", 2)
    with pytest.raises(OutOfPagesError, match="needs 2 more pages"):
        pool.ensure_capacity("b", 4)
    assert pool.num_free_pages == 1 and not pool.has("b")


def test_free_unknown_and_invalid_sizes():
    pool = PagePool(num_pages=1, page_size=1)
    assert pool.free("nobody") == 0
    with pytest.raises(ValueError):
        PagePool(0, 4)


def test_no_page_is_lost_or_shared():
    pool = PagePool(num_pages=16, page_size=3)
    for i in range(5):
        pool.ensure_capacity(i, 3 * i + 1)
    pool.free(2)
    pool.ensure_capacity(7, 10)
    owned = [p for s in pool.seq_ids() for p in pool.page_table(s)]
    assert len(owned) == len(set(owned))
    assert sorted(owned + pool._free) == list(range(16))
