"""Serves HTTP requests with world_size > 1: each one goes to rank 0's engine through the backend's request API."""

import asyncio
import threading
from typing import Any

from ad_runtime import SamplingParams

from .engine_thread import Update, failed_update, update_of


class DistributedEngine:
    """EngineThread's contract (submit -> asyncio.Queue of Update, abort, close) over a DistributedBackend.

    Rank 0 batches whatever is in flight, so concurrent HTTP requests share its steps. Updates arrive on the
    backend's reader thread and are handed to each request's event loop.
    """

    def __init__(self, backend: Any):
        self.backend = backend
        self._lock = threading.Lock()  # guards _clients, which the reader thread also touches
        self._clients: dict[asyncio.Queue, int] = {}  # the unfinished requests: their queue -> client id

    def submit(self, token_ids: list[int], params: SamplingParams, prompt: str | None, stream: bool = True) -> asyncio.Queue:
        """Send a request to rank 0; returns the asyncio queue that receives its Updates (only the last unless `stream`)."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def on_update(_: int, item: Any) -> None:
            if isinstance(item, BaseException):
                upd = failed_update(f"the model's ranks stopped: {item}")
            else:
                upd = update_of(item, self.backend.detok.decode)
            if upd.finished:
                with self._lock:
                    self._clients.pop(out, None)
            try:
                loop.call_soon_threadsafe(out.put_nowait, upd)
            except RuntimeError:  # the caller's event loop has closed: nobody listens, stop the request
                if not upd.finished:
                    self.abort(out)

        # Held across submit: a request that ends at once must not be registered after its last update.
        with self._lock:
            try:
                [self._clients[out]] = self.backend.submit([token_ids], [params], [prompt], stream, on_update)
            except Exception as e:  # noqa: BLE001 - the ranks are gone: this request fails, the server answers
                out.put_nowait(failed_update(f"the model's ranks stopped: {e}"))
        return out

    def abort(self, out: asyncio.Queue) -> None:
        """Stop the request whose updates go to `out` (its client went away) on rank 0."""
        with self._lock:
            cid = self._clients.pop(out, None)
        if cid is not None:
            self.backend.abort(cid)

    def close(self) -> None:
        """Abort what is still running: nobody will read it. The ranks belong to the LLM, which shuts them down."""
        with self._lock:
            cids, self._clients = list(self._clients.values()), {}
        for cid in cids:
            self.backend.abort(cid)
