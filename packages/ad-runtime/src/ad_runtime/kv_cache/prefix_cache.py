"""Prefix caching bookkeeping: a hash chain over full pages, page reference counts, LRU order of unused cached pages."""

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Parent of a sequence's first page.
ROOT_HASH = b""


def page_hash(parent: bytes, token_ids: Sequence[int], extra: bytes = b"") -> bytes:
    """Key of one full page: its parent's key, its token ids and `extra`.

    The parent makes the key name the whole prefix, not just this page. `extra` is where anything else that
    changes a page's KV goes (an adapter, an image's digest); nothing sets it yet. A cryptographic digest,
    because two different prefixes that collided would silently share KV.
    """
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra:
        h.update(extra)
    return h.digest()


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up in the cache at admission and how many were found (read by metrics)."""

    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class PrefixCache:
    """Reference counts of every page and the map between page keys and the pages that hold them.

    A page is in one of three states: used (refcount > 0, by that many page tables), cached (refcount 0, keyed,
    in LRU order, reusable by a lookup or evictable), or free (refcount 0, no key; the pool's free list).
    """

    def __init__(self, num_pages: int):
        self._refs = [0] * num_pages
        self._page_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        # Cached pages nobody uses, least recently released first: eviction takes from the front.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self.num_evictions = 0  # cached pages dropped to make room (for metrics)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    @property
    def num_cached(self) -> int:
        """Pages that hold a key (used or not)."""
        return len(self._key_of)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def is_evictable(self, page: int) -> bool:
        return page in self._lru

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """Pages holding the longest prefix of `keys` (a chain: the first miss ends it)."""
        out = []
        for k in keys:
            page = self._page_of.get(k)
            if page is None:
                break
            out.append(page)
        return out

    def acquire(self, page: int) -> None:
        """One more page table holds `page` (a cached page stops being evictable)."""
        if self._refs[page] == 0:
            self._lru.pop(page, None)
        self._refs[page] += 1

    def release(self, page: int) -> bool:
        """One page table fewer holds `page`; True if it is now free (unused and not cached)."""
        assert self._refs[page] > 0, f"page {page} released more often than acquired"
        self._refs[page] -= 1
        if self._refs[page] > 0:
            return False
        if page in self._key_of:
            self._lru[page] = None  # most recently released: evicted last
            return False
        return True

    def insert(self, page: int, key: bytes) -> bool:
        """Key a full, written page that a sequence holds; False if the key or the page is already taken.

        A key already held by another page (two sequences computed the same prefix at once) keeps that page;
        this one stays private and returns to the free list when released.
        """
        assert self._refs[page] > 0, f"only a page in use can be cached (page {page})"
        if key in self._page_of or page in self._key_of:
            return False
        self._page_of[key] = page
        self._key_of[page] = key
        return True

    def evict(self) -> int:
        """Drop the least recently released cached page's key and return the page (now free)."""
        page, _ = self._lru.popitem(last=False)
        self.num_evictions += 1
        del self._page_of[self._key_of.pop(page)]
        return page
