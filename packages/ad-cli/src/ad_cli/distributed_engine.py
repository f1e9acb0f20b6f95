"""Serves HTTP requests with world_size > 1 or engine_process: each one goes to rank 0's engine (another process)
through the backend's request API."""

import asyncio
import logging
import threading
from typing import Any

from ad_runtime import SamplingParams

from .engine_thread import Update, failed_update, update_of

logger = logging.getLogger(__name__)


class DistributedEngine:
    """EngineThread's contract (submit -> asyncio.Queue of Update, abort, close) over a DistributedBackend.

    Rank 0 batches whatever is in flight, so concurrent HTTP requests share its steps. Updates arrive on the
    backend's reader thread and are handed to each request's event loop.
    """

    def __init__(self, backend: Any, metrics: Any = None):
        self.backend = backend
        # ServerMetrics: each request's tracker sees what reaches this process (a stream's every step, else the end).
        self._metrics = metrics
        self._lock = threading.Lock()  # guards _clients, which the reader thread also touches
        self._clients: dict[asyncio.Queue, int] = {}  # the unfinished requests: their queue -> client id
        self._trackers: dict[asyncio.Queue, Any] = {}  # their metrics trackers (with metrics)
        self._log_lock = threading.Lock()
        self._logged_failure = False  # the ranks' failure goes to the log once, with its traceback

    def _failed(self, error: BaseException) -> Update:
        """A request's last update when the ranks have stopped: one line for the client, the traceback to the log."""
        reason = _one_line(error)
        with self._log_lock:  # not _lock: submit() holds that when it gets here
            first, self._logged_failure = not self._logged_failure, True
        if first:
            logger.error("the model's ranks stopped: %s", reason, exc_info=error)
        return failed_update(f"the model's ranks stopped: {reason}")

    def health(self) -> str | None:
        """None while the ranks serve; otherwise why they stopped, in one line ("rank 1 of 2 died: ...")."""
        return self.backend.health()

    # Rank 0's counts as of its last step (they travel with that step's updates): what /metrics reports.
    @property
    def num_running(self) -> int:
        return self.backend.engine_stats[0]

    @property
    def num_waiting(self) -> int:
        return self.backend.engine_stats[1]

    @property
    def kv_cache_usage(self) -> float:
        return self.backend.engine_stats[2]

    def submit(self, token_ids: list[int], params: SamplingParams, prompt: str | None,
               stream: bool = True) -> asyncio.Queue:
        """Send a request to rank 0; returns the asyncio queue that receives its Updates (the last only unless
        `stream`)."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        tracker = self._metrics.track(len(token_ids)) if self._metrics is not None else None

        def on_update(_: int, item: Any) -> None:
            if isinstance(item, BaseException):
                upd = self._failed(item)
                if tracker is not None:
                    tracker.failed()
            else:
                upd = update_of(item, self.backend.detok.stream_text)
                if tracker is not None:
                    tracker.update(item)
            if upd.finished:
                with self._lock:
                    self._clients.pop(out, None)
                    self._trackers.pop(out, None)
            try:
                loop.call_soon_threadsafe(out.put_nowait, upd)
            except RuntimeError:  # the caller's event loop has closed: nobody listens, stop the request
                if not upd.finished:
                    self.abort(out)

        # Held across submit: a request that ends at once must not be registered after its last update.
        with self._lock:
            try:
                [self._clients[out]] = self.backend.submit([token_ids], [params], [prompt], stream, on_update)
                if tracker is not None:
                    self._trackers[out] = tracker
            except Exception as e:  # noqa: BLE001 - the ranks are gone: this request fails, the server answers
                out.put_nowait(self._failed(e))
                if tracker is not None:
                    tracker.failed()
        return out

    def abort(self, out: asyncio.Queue) -> None:
        """Stop the request whose updates go to `out` (its client went away) on rank 0."""
        with self._lock:
            cid = self._clients.pop(out, None)
            tracker = self._trackers.pop(out, None)
        if tracker is not None:
            tracker.aborted()  # a no-op when the request has ended
        if cid is not None:
            self.backend.abort(cid)

    def close(self) -> None:
        """Abort what is still running: nobody will read it. The ranks belong to the LLM, which shuts them down."""
        with self._lock:
            cids, self._clients, self._trackers = list(self._clients.values()), {}, {}
        for cid in cids:
            self.backend.abort(cid)


def _one_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__
