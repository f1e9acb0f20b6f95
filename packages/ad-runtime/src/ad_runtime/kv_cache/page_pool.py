"""Page bookkeeping of the paged KV cache: a free list, per-sequence page tables, shared cached pages; no tensors."""

from collections.abc import Hashable, Sequence

from .prefix_cache import PrefixCache


class OutOfPagesError(RuntimeError):
    """Raised when a sequence needs more pages than are free; the scheduler should preempt and retry."""


class PagePool:
    """Hands out page ids 0..num_pages-1 to sequences; the tensors holding the pages live elsewhere.

    Invariant: a page is free (in the free list), cached and unused (evictable, see PrefixCache), or held by
    as many page tables as its reference count. Only full pages whose KV is written are ever cached (the
    scheduler decides which, through `cache_pages`); a sequence writes only into pages it alone holds.
    Without `cache_pages` calls every page has one holder at most, as in a pool without prefix caching.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"PagePool needs positive num_pages and page_size, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Pop from the end: lowest ids are handed out first, which keeps tests and dumps readable.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}
        # Per sequence: how many leading pages of its table were offered to the cache (so each is offered once).
        self._offered: dict[Hashable, int] = {}
        self.cache = PrefixCache(num_pages)

    @property
    def num_free_pages(self) -> int:
        """Pages a sequence can get now: free ones and cached ones nobody uses (evicted on demand)."""
        return len(self._free) + self.cache.num_evictable

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    @property
    def usage(self) -> float:
        """Share of pages in use (pages the prefix cache could evict on demand count as free)."""
        return self.num_used_pages / self.num_pages if self.num_pages else 0.0

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    def num_missing_pages(self, total_tokens: int, seq_id: Hashable | None = None) -> int:
        """Pages that `seq_id` (None: a new sequence) still needs to hold `total_tokens` tokens."""
        have = len(self._tables.get(seq_id, ())) if seq_id is not None else 0
        return max(0, self.pages_for(total_tokens) - have)

    def can_allocate(self, total_tokens: int, seq_id: Hashable | None = None) -> bool:
        """Whether a sequence can grow to `total_tokens` tokens with the pages that are free now."""
        return self.num_missing_pages(total_tokens, seq_id) <= self.num_free_pages

    def ensure_capacity(self, seq_id: Hashable, total_tokens: int) -> list[int]:
        """Grow `seq_id`'s page table to hold `total_tokens` tokens; returns the newly added pages."""
        missing = self.num_missing_pages(total_tokens, seq_id)
        if missing > self.num_free_pages:
            raise OutOfPagesError(
                f"sequence {seq_id!r} needs {missing} more pages for {total_tokens} tokens, "
                f"only {self.num_free_pages} of {self.num_pages} are free"
            )
        new = [self._take() for _ in range(missing)]
        self._tables.setdefault(seq_id, []).extend(new)
        return new

    def _take(self) -> int:
        # Free pages first: a cached page is evicted (least recently used first) only when none is left.
        page = self._free.pop() if self._free else self.cache.evict()
        self.cache.acquire(page)
        return page

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """Cached pages holding the longest prefix of the page keys `keys`."""
        return self.cache.match(keys)

    def num_evictable_in(self, pages: Sequence[int]) -> int:
        """How many of `pages` are cached and unused: attaching them takes them out of `num_free_pages`."""
        return sum(self.cache.is_evictable(p) for p in pages)

    def attach(self, seq_id: Hashable, pages: Sequence[int]) -> None:
        """Start `seq_id`'s page table with cached pages (from `match`), shared with whoever else holds them."""
        if self._tables.get(seq_id):
            raise ValueError(f"sequence {seq_id!r} already holds pages; cached pages start a page table")
        for p in pages:
            self.cache.acquire(p)
        self._tables[seq_id] = list(pages)
        self._offered[seq_id] = len(pages)  # they are cached already

    def cache_pages(self, seq_id: Hashable, keys: Sequence[bytes], num_pages: int) -> None:
        """Offer `seq_id`'s first `num_pages` pages (full, their KV written) to the cache under `keys[i]`."""
        done = self._offered.get(seq_id, 0)
        table = self._tables.get(seq_id)
        if table is None or done >= num_pages:  # the common case: called every step, nothing new
            return
        num_pages = min(num_pages, len(table))
        for i in range(done, num_pages):
            self.cache.insert(table[i], keys[i])
        self._offered[seq_id] = max(done, num_pages)

    def free(self, seq_id: Hashable) -> int:
        """Release all pages of `seq_id`; returns how many it held (0 for an unknown sequence).

        Pages others still hold stay theirs; cached ones become evictable, the rest go back to the free list.
        """
        pages = self._tables.pop(seq_id, [])
        self._offered.pop(seq_id, None)
        # Reversed: the next allocation reuses the same free ids in the same order, and a sequence's later
        # (cached) pages are evicted before its earlier ones, which more prompts share.
        for p in reversed(pages):
            if self.cache.release(p):
                self._free.append(p)
        return len(pages)

    def page_table(self, seq_id: Hashable) -> list[int]:
        """A copy of `seq_id`'s page ids in token order (empty if it holds none)."""
        return list(self._tables.get(seq_id, ()))

    def num_pages_of(self, seq_id: Hashable) -> int:
        return len(self._tables.get(seq_id, ()))

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> list[Hashable]:
        return list(self._tables)

    def __repr__(self) -> str:
        return (
            f"PagePool(num_pages={self.num_pages}, page_size={self.page_size}, free={len(self._free)}, "
            f"cached={self.cache.num_cached}, evictable={self.cache.num_evictable}, sequences={len(self._tables)})"
        )
