"""The thread-safe front of one Engine: any thread submits, aborts and waits; one step runs at a time.

Threads that wait for their requests take turns stepping the engine, and every step advances every
request in flight, so callers on several threads share continuous batching without a dedicated thread
(the server's EngineThread is just one more caller that steps).
"""

import logging
import threading
from collections.abc import Callable, Iterator

from ..sampling_params import SamplingParams
from .engine import Engine
from .errors import one_line
from .request import Request

logger = logging.getLogger(__name__)


class EngineCore:
    """Serialises access to an Engine; a failure of the engine itself fails the requests in flight, not the core."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.RLock()
        # The last error the engine could not pin on a request (None while healthy); the core serves on after it.
        self.last_error: str | None = None

    @property
    def has_unfinished(self) -> bool:
        with self._lock:
            return self.engine.has_unfinished

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (the tokenizer is read-only, so no lock)."""
        return self.engine.detok.decode(token_ids, skip_special_tokens)

    def stream_text(self, req: Request) -> str:
        """The text a stream of `req` may show now (Detokenizer.stream_text)."""
        return self.engine.detok.stream_text(req)

    def submit(self, prompt_token_ids: list[int], params: SamplingParams, prompt: str | None = None) -> Request:
        """Queue one request; a request that can never run comes back failed, with its reason."""
        with self._lock:
            return self.engine.add_request(prompt_token_ids, params, prompt)

    def abort(self, req: Request, message: str) -> None:
        """End `req` if it has not finished (frees its pages at once)."""
        with self._lock:
            self.engine.abort(req, message)

    def step(self) -> list[Request]:
        """One engine step; returns the requests that changed (new token, finished or failed)."""
        with self._lock:
            try:
                return self.engine.step()
            except Exception as e:  # noqa: BLE001 - scheduling itself broke: fail what is in flight, keep serving
                logger.exception("engine step failed")
                self.last_error = one_line(e)
                return self.engine.abort_all(f"engine step failed: {self.last_error}")

    def run(self, requests: list[Request]) -> None:
        """Step until every request of `requests` has ended (other callers' requests advance too)."""
        # The first unfinished request: an ended one never runs again, so the scan resumes there (two scans of
        # every request per step took a measurable share of the host's time between steps of a large batch).
        i = 0
        while True:
            while i < len(requests) and requests[i].is_finished:
                i += 1
            if i == len(requests):
                return
            with self._lock:
                if not requests[i].is_finished:
                    self.step()

    def stream(self, req: Request, on_progress: Callable[[Request], None] | None = None) -> Iterator[Request]:
        """Yield `req` whenever it has new output (and once when it ends); steps when nobody else has."""
        seen = -1
        while True:
            with self._lock:
                if not req.is_finished and len(req.output_token_ids) == seen:
                    self.step()
                if req.is_finished or len(req.output_token_ids) != seen:
                    seen = len(req.output_token_ids)
                    if on_progress is not None:
                        on_progress(req)
                    done = req.is_finished
                else:
                    continue
            yield req
            if done:
                return
