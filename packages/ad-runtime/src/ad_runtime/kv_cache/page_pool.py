"""Page bookkeeping for the paged KV cache: a free list and per-sequence page tables, no tensors."""

from collections.abc import Hashable


class OutOfPagesError(RuntimeError):
    """Raised when a sequence needs more pages than are free; the scheduler should preempt and retry."""


class PagePool:
    """Hands out page ids 0..num_pages-1 to sequences; the tensors holding the pages live elsewhere.

    Invariant: every page id is either in the free list or in exactly one sequence's page table.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"PagePool needs positive num_pages and page_size, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        # Pop from the end: lowest ids are handed out first, which keeps tests and dumps readable.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._tables: dict[Hashable, list[int]] = {}

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    def num_missing_pages(self, total_tokens: int, seq_id: Hashable | None = None) -> int:
        """Pages that `seq_id` (None: a new sequence) still needs to hold `total_tokens` tokens."""
        have = len(self._tables.get(seq_id, ())) if seq_id is not None else 0
        return max(0, self.pages_for(total_tokens) - have)

    def can_allocate(self, total_tokens: int, seq_id: Hashable | None = None) -> bool:
        """Whether a sequence can grow to `total_tokens` tokens with the pages that are free now."""
        return self.num_missing_pages(total_tokens, seq_id) <= len(self._free)

    def ensure_capacity(self, seq_id: Hashable, total_tokens: int) -> list[int]:
        """Grow `seq_id`'s page table to hold `total_tokens` tokens; returns the newly added pages."""
        missing = self.num_missing_pages(total_tokens, seq_id)
        if missing > len(self._free):
            raise OutOfPagesError(
                f"sequence {seq_id!r} needs {missing} more pages for {total_tokens} tokens, "
                f"only {len(self._free)} of {self.num_pages} are free"
            )
        new = [self._free.pop() for _ in range(missing)]
        self._tables.setdefault(seq_id, []).extend(new)
        return new

    def free(self, seq_id: Hashable) -> int:
        """Return all pages of `seq_id` to the pool; returns how many (0 for an unknown sequence)."""
        pages = self._tables.pop(seq_id, [])
        # Reversed so that the next allocation reuses the same ids in the same order.
        self._free.extend(reversed(pages))
        return len(pages)

    def page_table(self, seq_id: Hashable) -> list[int]:
        """A copy of `seq_id`'s page ids in token order (empty if it holds none)."""
        return list(self._tables.get(seq_id, ()))

    def has(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    def seq_ids(self) -> list[Hashable]:
        return list(self._tables)

    def __repr__(self) -> str:
        return (
            f"PagePool(num_pages={self.num_pages}, page_size={self.page_size}, "
            f"free={len(self._free)}, sequences={len(self._tables)})"
        )
