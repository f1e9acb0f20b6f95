"""Continuous batching: which requests run this step, with how many tokens, within page and token limits."""

import logging
from collections import deque
from dataclasses import dataclass

from ..kv_cache.page_pool import PagePool
from ..kv_cache.prefix_cache import ROOT_HASH, PrefixCacheStats, page_hash
from .request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledSequence:
    request: Request
    num_new_tokens: int

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1 and self.request.num_computed_tokens > 0

    @property
    def completes_prompt(self) -> bool:
        """After this step every known token is cached, so a new token can be sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


class Scheduler:
    """FIFO admission; running requests first; the newest running request is preempted when pages run out.

    With prefix caching, a request starts with the cached pages of its longest cached prefix and computes from
    there; every full page whose KV is written is cached once the step that wrote it has been launched (later
    steps run after it, on the same stream), and stays cached after its sequences end until evicted.
    """

    def __init__(
        self,
        pool: PagePool,
        max_batch_size: int,
        max_num_tokens: int,
        enable_chunked_prefill: bool,
        num_pages: int,
        enable_prefix_caching: bool = False,
        has_state: bool = False,
    ):
        self.pool = pool
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.chunked = enable_chunked_prefill
        self.num_pages = num_pages
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: oldest first
        # At most max_batch_size requests run, so each holds one of max_batch_size state slots until it
        # finishes or is preempted (a preempted request recomputes from token 0, state included).
        self._free_slots: list[int] = list(range(max_batch_size - 1, -1, -1))
        # Cached pages hold KV only: a model with per-sequence recurrent state (Mamba, linear attention) would
        # also need that state as of the page boundary, which its state caches do not keep.
        self.prefix_caching = enable_prefix_caching and not has_state
        if enable_prefix_caching and has_state:
            logger.info("prefix caching is off for this model: its recurrent state (Mamba / linear attention) "
                        "cannot resume from cached pages, so every prompt is computed in full")
        self.prefix_stats = PrefixCacheStats()

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fits_at_all(self, max_total_tokens: int) -> bool:
        return self.pool.pages_for(max_total_tokens) <= self.num_pages

    def _release_slot(self, req: Request) -> None:
        if req.slot is not None:
            self._free_slots.append(req.slot)
            req.slot = None

    def preempt(self, req: Request) -> None:
        """Free the request's pages; it will be recomputed (prompt + output so far) later.

        With prefix caching its full pages stay cached, so it resumes from them unless they are evicted first.
        """
        self._cache_computed_pages(req)
        self.pool.free(req.request_id)
        self._release_slot(req)
        req.num_computed_tokens = 0
        req.num_offered_pages = 0  # its pages are freed: a later admission starts a new page table
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)
        logger.info("preempted request %d (out of KV-cache pages)", req.request_id)

    def finish(self, req: Request) -> None:
        self._cache_computed_pages(req)
        self.pool.free(req.request_id)
        self._release_slot(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:  # aborted, or preempted while its last token was still on the device (overlap)
            self.waiting.remove(req)

    def schedule(self, skip: set[int] = frozenset()) -> list[ScheduledSequence]:
        """Pick this step's batch: prefills (and prefill chunks) first, then decodes.

        `skip`: ids (`id(request)`) of running requests that need no row this step (they finish when the
        engine reads their last token).
        """
        if self.prefix_caching:
            for req in self.running:
                self._cache_computed_pages(req)
        batch = self._continue_running(self.max_num_tokens, skip)
        batch += self._admit_waiting(self.max_num_tokens - sum(s.num_new_tokens for s in batch))
        # Stable: multi-token rows first, then one-token rows (decodes, and one-token prompts or chunks, which the
        # cache metadata and the attention ops run with the decodes).
        batch.sort(key=lambda s: s.num_new_tokens == 1)
        return batch

    def _continue_running(self, budget: int, skip: set[int]) -> list[ScheduledSequence]:
        """Requests already running keep going (decodes and unfinished prefill chunks), within `budget` tokens."""
        batch: list[ScheduledSequence] = []
        scheduled_ids: set[int] = set()
        ps = self.pool.page_size
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or id(req) in skip:  # preempted while making room, or done
                continue
            n = req.num_pending_tokens
            if n > budget:
                if not self.chunked or budget == 0:
                    continue
                n = budget
            total = req.num_computed_tokens + n
            # Most steps a request stays within the pages it holds: then there is nothing to allocate or preempt.
            if self.pool.num_pages_of(req.request_id) * ps < total:
                if not self._make_room(req, total, scheduled_ids):
                    continue
                self.pool.ensure_capacity(req.request_id, total)
            batch.append(ScheduledSequence(req, n))
            scheduled_ids.add(req.request_id)
            budget -= n
        return batch

    def _admit_waiting(self, budget: int) -> list[ScheduledSequence]:
        """Admit waiting requests in arrival order (preempted ones are at the front), within `budget` tokens.

        A request whose next uncached page another request is computing now waits for it (it would compute the
        same KV again).
        """
        batch: list[ScheduledSequence] = []
        if len(self.running) >= self.max_batch_size or budget <= 0:
            return batch  # nobody can be admitted: skip collecting the keys in flight (a loop over running requests)
        in_flight = self._keys_in_flight() if self.prefix_caching and self.waiting else set()
        i = 0
        while i < len(self.waiting) and len(self.running) < self.max_batch_size and budget > 0:
            req = self.waiting[i]
            cached, next_key = self._cached_prefix(req) if self.prefix_caching else ([], None)
            if next_key in in_flight:
                i += 1
                continue
            start = len(cached) * self.pool.page_size
            n = req.num_tokens - start
            if n > budget:
                if not self.chunked:
                    break
                n = budget
            # Cached pages that nobody uses count as free pages until this request takes them.
            new_pages = self.pool.pages_for(start + n) - len(cached)
            if new_pages + self.pool.num_evictable_in(cached) > self.pool.num_free_pages:
                break  # never preempt to admit: wait for pages to free up
            del self.waiting[i]
            if self.prefix_caching:
                self.pool.attach(req.request_id, cached)
                req.num_computed_tokens = start
                if req.num_preemptions == 0:  # prompt tokens, counted once per request
                    req.num_cached_tokens = start
                    self.prefix_stats.queried_tokens += req.num_tokens
                    self.prefix_stats.hit_tokens += start
                in_flight.update(req.page_keys[len(cached):])
            self.pool.ensure_capacity(req.request_id, req.num_computed_tokens + n)
            req.status = RequestStatus.RUNNING
            req.slot = self._free_slots.pop()
            self.running.append(req)
            batch.append(ScheduledSequence(req, n))
            budget -= n
        return batch

    def _make_room(self, req: Request, total_tokens: int, scheduled: set[int]) -> bool:
        """Preempt the newest unscheduled running requests until `req` fits; False if it cannot."""
        while self.pool.num_missing_pages(total_tokens, req.request_id) > self.pool.num_free_pages:
            victims = [r for r in reversed(self.running) if r is not req and r.request_id not in scheduled]
            if not victims:
                # Nothing else to evict: preempt `req` itself and retry it when others finish.
                self.preempt(req)
                return False
            self.preempt(victims[0])
        return True

    # ---- prefix caching ------------------------------------------------------------------------------

    def _extend_keys(self, req: Request, num_tokens: int) -> None:
        """Extend `req.page_keys` over the full pages of its first `num_tokens` known tokens."""
        ps, keys = self.pool.page_size, req.page_keys
        prompt, out = req.prompt_token_ids, req.output_token_ids
        for i in range(len(keys), num_tokens // ps):
            a, b = i * ps, (i + 1) * ps
            toks = prompt[a:b] if b <= len(prompt) else prompt[a:] + out[max(0, a - len(prompt)) : b - len(prompt)]
            keys.append(page_hash(keys[-1] if keys else ROOT_HASH, toks))

    def _cached_prefix(self, req: Request) -> tuple[list[int], bytes | None]:
        """Cached pages of the longest cached prefix of a waiting request, leaving at least one token to compute, and
        the key of the first page it would compute if that is a full page it could take from the cache (else None).

        The token left is the one whose logits give the next token; its KV goes to a page of its own, so a
        fully cached prompt of whole pages recomputes its last page rather than write into a shared one.
        """
        assert req.num_computed_tokens == 0 and not self.pool.num_pages_of(req.request_id)
        self._extend_keys(req, req.num_known_tokens)
        limit = min(len(req.page_keys), (req.num_tokens - 1) // self.pool.page_size)
        cached = self.pool.match(req.page_keys[:limit])
        return cached, req.page_keys[len(cached)] if len(cached) < limit else None

    def _cache_computed_pages(self, req: Request) -> None:
        """Offer the request's full pages whose KV a launched step wrote to the cache.

        Only tokens the host has read count: with overlap, a sampled token still on the device is computed but
        its id is unknown (and may be an end token that is dropped), so its page waits.
        """
        if not self.prefix_caching:
            return
        n = min(req.num_computed_tokens, req.num_known_tokens) // self.pool.page_size
        if n <= req.num_offered_pages:  # most steps: no page filled since the last offer (the pool would ignore it)
            return
        if n > len(req.page_keys):
            self._extend_keys(req, n * self.pool.page_size)
        self.pool.cache_pages(req.request_id, req.page_keys, n)
        req.num_offered_pages = n

    def _keys_in_flight(self) -> set[bytes]:
        """Keys of pages that running requests have still to compute (their prompts' pages not yet computed)."""
        ps = self.pool.page_size
        out: set[bytes] = set()
        for req in self.running:
            done = req.num_computed_tokens // ps
            if done < len(req.page_keys):
                out.update(req.page_keys[done:])
        return out
