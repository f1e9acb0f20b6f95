"""Runs an LLM's engine on one background thread so many HTTP requests share continuous batching."""

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from ad_runtime import SamplingParams
from ad_runtime.executor.errors import one_line
from ad_runtime.executor.request_loop import RequestLoop

logger = logging.getLogger(__name__)


@dataclass
class Update:
    """A snapshot of a request after a step: all output ids so far, text, and whether it ended."""

    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    error: str | None = None
    internal: bool = False  # the server failed (a step, a rank), not the request: a 500, not a 400
    logprobs: list[dict[int, float]] | None = None  # per token of token_ids, when the request asked for them
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied (usage.prompt_tokens_details)


def update_of(req: Any, text_of: Callable[[Any], str]) -> Update:
    """The Update of an engine request; `text_of` (Detokenizer.stream_text) decides what text it shows."""
    logprobs = getattr(req, "logprobs", None)
    return Update(list(req.output_token_ids), text_of(req), req.is_finished, req.finish_reason, req.error,
                  logprobs=None if logprobs is None else list(logprobs),
                  num_cached_tokens=int(getattr(req, "num_cached_tokens", 0) or 0))


def failed_update(message: str) -> Update:
    """The last Update of a request the server could not finish."""
    return Update([], "", True, "error", message, internal=True)


class EngineThread:
    """Drives a local engine core with the request loop on one background thread: submissions arrive on a
    queue; updates go back to each caller's asyncio queue.

    The same contract as DistributedEngine: submit(...) -> asyncio.Queue of Update, abort(queue), health(), close().
    """

    def __init__(self, llm: Any, metrics: Any = None):
        self.core = llm.core
        self._metrics = metrics  # ServerMetrics: each request's progress goes to its tracker (None: no metrics)
        self._trackers: dict[asyncio.Queue, Any] = {}
        if self.core is None:
            raise ValueError("EngineThread needs the engine in this process (world_size 1); use DistributedEngine")
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._stopped: str | None = None  # "the engine stopped: <why>", once the thread ended by an error
        self._loops: dict[asyncio.Queue, asyncio.AbstractEventLoop] = {}  # each request's caller's event loop
        # A step's updates, per event loop, handed over together before the next step (_flush): one wake-up of
        # each loop a step, not one per request (256 streams: 256 self-pipe writes and wake-ups a step, all
        # holding the GIL that the engine thread needs).
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Update]]] = {}
        self._pending_adds = 0  # submissions in the inbox not yet taken by the engine thread
        self._count_lock = threading.Lock()
        self._requests = RequestLoop(self.core, self._receive, self._publish,
                                     self._observe if metrics is not None else None)
        self._thread = threading.Thread(target=self._run, name="ad-engine", daemon=True)
        self._thread.start()

    def submit(self, token_ids: list[int], params: SamplingParams, prompt: str | None,
               stream: bool = True) -> asyncio.Queue:
        """Queue a request; returns the asyncio queue that receives its Updates (only the last unless `stream`)."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        if self._stopped is not None:
            out.put_nowait(failed_update(self._stopped))
            return out
        self._loops[out] = loop
        if self._metrics is not None:
            self._trackers[out] = self._metrics.track(len(token_ids))
        with self._count_lock:
            self._pending_adds += 1
        self._inbox.put(("add", out, token_ids, params, prompt, stream))
        return out

    def abort(self, out: asyncio.Queue) -> None:
        """Stop the request whose updates go to `out` (its client went away); no more updates come."""
        tracker = self._trackers.pop(out, None)
        if tracker is not None:
            tracker.aborted()
        self._inbox.put(("abort", out))

    @property
    def num_waiting(self) -> int:
        """Requests submitted but not yet taken by the engine thread plus those the engine has not scheduled."""
        return self._pending_adds + len(self.core.engine.scheduler.waiting)

    @property
    def num_running(self) -> int:
        """Requests the scheduler runs (read without the engine's lock: a count, possibly one step old)."""
        return len(self.core.engine.scheduler.running)

    @property
    def kv_cache_usage(self) -> float:
        """Share of KV-cache pages in use (pages the prefix cache could evict on demand count as free)."""
        return self.core.engine.scheduler.pool.usage

    def health(self) -> str | None:
        """None while the engine thread serves; else why it cannot."""
        if self._stopped is not None:
            return self._stopped
        if not self._thread.is_alive() and not self._stop.is_set():
            return "the engine thread is not running"
        return None

    def _receive(self, block: bool) -> Iterator[tuple]:
        self._flush()  # the last step's updates, before waiting for or running the next
        msgs = []
        try:
            # A short wait when idle, so that close() is seen promptly.
            msgs.append(self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait())
            while True:
                msgs.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        if self._stop.is_set():
            msgs.append(("stop",))
        for msg in msgs:
            yield msg
            # Counted out only once the loop has handed the add to the scheduler (it resumes us after handling
            # it): dropping the count earlier left a moment in which num_waiting missed the request, and a
            # request that should have got 503 was admitted.
            if msg[0] == "add":
                with self._count_lock:
                    self._pending_adds -= 1

    def _publish(self, out: asyncio.Queue, req: Any) -> bool:
        """Hand an update to the caller's event loop; False if that loop has closed (the caller went away)."""
        loop = self._loops.get(out)
        delivered = loop is not None and not loop.is_closed()
        if delivered:
            self._pending.setdefault(loop, []).append((out, update_of(req, self.core.stream_text)))
        if req.is_finished or not delivered:
            self._loops.pop(out, None)
            tracker = self._trackers.pop(out, None)
            if tracker is not None:
                tracker.update(req)  # a request refused at once was never observed
                if not delivered:
                    tracker.aborted()  # nobody listens: the loop aborts the request
        return delivered

    def _flush(self) -> None:
        """Hand each event loop its pending updates in one call (a loop closed meanwhile loses them; its
        requests see the closed loop at their next update and are aborted)."""
        pending, self._pending = self._pending, {}
        for loop, items in pending.items():
            with suppress(RuntimeError):  # the loop closed
                loop.call_soon_threadsafe(_put_all, items)

    def _observe(self, out: asyncio.Queue, req: Any) -> None:
        """After every step that changed the request (streamed or not): its tracker counts the new tokens."""
        tracker = self._trackers.get(out)
        if tracker is not None:
            tracker.update(req)

    def _run(self) -> None:
        try:
            self._requests.run()
            self._flush()  # the stop came after a step: its updates still go out
        except BaseException as e:  # noqa: BLE001 - a bug here must not leave callers waiting forever
            logger.exception("the engine thread failed")
            self._stopped = f"the engine stopped: {one_line(e)}"
            self._flush()  # updates of the last good step come before the failure
            for out, _ in self._requests.fail_all(self._stopped):
                self._tell_failed(out)
            while True:  # submissions that raced the crash
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    return
                if item[0] == "add":
                    self._tell_failed(item[1])

    def _tell_failed(self, out: asyncio.Queue) -> None:
        tracker = self._trackers.pop(out, None)
        if tracker is not None:
            tracker.failed()
        loop = self._loops.pop(out, None)
        if loop is not None:
            with suppress(RuntimeError):  # the loop closed: nobody listens
                loop.call_soon_threadsafe(out.put_nowait, failed_update(self._stopped))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _put_all(items: list[tuple[asyncio.Queue, Update]]) -> None:
    """On the callers' event loop: each update onto its request's queue."""
    for out, update in items:
        out.put_nowait(update)
