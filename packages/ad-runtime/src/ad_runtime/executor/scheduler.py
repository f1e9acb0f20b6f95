"""Continuous batching: which requests run this step, with how many tokens, within page and token limits."""

import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from .request import Request, RequestStatus

logger = logging.getLogger(__name__)


class PagePoolLike(Protocol):
    page_size: int

    @property
    def num_free_pages(self) -> int: ...

    def page_table(self, seq_id: int) -> list[int]: ...

    def ensure_capacity(self, seq_id: int, total_tokens: int) -> list[int]: ...

    def free(self, seq_id: int) -> None: ...


@dataclass
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
    """FIFO admission; running requests first; the newest running request is preempted when pages run out."""

    def __init__(
        self,
        pool: PagePoolLike,
        max_batch_size: int,
        max_num_tokens: int,
        enable_chunked_prefill: bool,
        num_pages: int,
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

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _pages_needed(self, req: Request, total_tokens: int) -> int:
        have = len(self.pool.page_table(req.request_id))
        need = -(-total_tokens // self.pool.page_size)
        return max(0, need - have)

    def fits_at_all(self, req: Request, max_total_tokens: int) -> bool:
        return -(-max_total_tokens // self.pool.page_size) <= self.num_pages

    def _release_slot(self, req: Request) -> None:
        if req.slot is not None:
            self._free_slots.append(req.slot)
            req.slot = None

    def preempt(self, req: Request) -> None:
        """Free the request's pages; it will be recomputed (prompt + output so far) later."""
        self.pool.free(req.request_id)
        self._release_slot(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.running.remove(req)
        self.waiting.appendleft(req)
        logger.info("preempted request %d (out of KV-cache pages)", req.request_id)

    def finish(self, req: Request) -> None:
        self.pool.free(req.request_id)
        self._release_slot(req)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:  # preempted while its last token was still on the device (overlap)
            self.waiting.remove(req)

    def schedule(self, skip: set[int] = frozenset()) -> list[ScheduledSequence]:
        """Pick this step's batch: prefills (and prefill chunks) first, then decodes.

        `skip`: ids (`id(request)`) of running requests that need no row this step (they finish when the
        engine reads their last token).
        """
        budget = self.max_num_tokens
        batch: list[ScheduledSequence] = []
        scheduled_ids: set[int] = set()
        # 1. Requests already running keep going (decodes and unfinished prefill chunks).
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING or id(req) in skip:  # preempted while making room, or done
                continue
            n = req.num_pending_tokens
            if n > budget:
                if not self.chunked or budget == 0:
                    continue
                n = budget
            if not self._make_room(req, req.num_computed_tokens + n, scheduled_ids):
                continue
            self.pool.ensure_capacity(req.request_id, req.num_computed_tokens + n)
            batch.append(ScheduledSequence(req, n))
            scheduled_ids.add(req.request_id)
            budget -= n
        # 2. Admit waiting requests in arrival order (preempted ones are at the front).
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            req = self.waiting[0]
            n = req.num_pending_tokens
            if n > budget:
                if not self.chunked:
                    break
                n = budget
            if self._pages_needed(req, req.num_computed_tokens + n) > self.pool.num_free_pages:
                break  # never preempt to admit: wait for pages to free up
            self.waiting.popleft()
            self.pool.ensure_capacity(req.request_id, req.num_computed_tokens + n)
            req.status = RequestStatus.RUNNING
            req.slot = self._free_slots.pop()
            self.running.append(req)
            batch.append(ScheduledSequence(req, n))
            scheduled_ids.add(req.request_id)
            budget -= n
        # Stable: multi-token rows first, then one-token rows (decodes, and one-token prompts or chunks, which the
        # cache metadata and the attention ops run with the decodes).
        batch.sort(key=lambda s: s.num_new_tokens == 1)
        return batch

    def _make_room(self, req: Request, total_tokens: int, scheduled: set[int]) -> bool:
        """Preempt the newest unscheduled running requests until `req` fits; False if it cannot."""
        while self._pages_needed(req, total_tokens) > self.pool.num_free_pages:
            victims = [r for r in reversed(self.running) if r is not req and r.request_id not in scheduled]
            if not victims:
                # Nothing else to evict: preempt `req` itself and retry it when others finish.
                self.preempt(req)
                return False
            self.preempt(victims[0])
        return True
