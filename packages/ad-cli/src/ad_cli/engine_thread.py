"""Runs an LLM's engine on one background thread so many HTTP requests share continuous batching."""

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Any

from ad_runtime import SamplingParams


@dataclass
class Update:
    """A snapshot of a request after a step: all output ids so far, text, and whether it ended."""

    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    error: str | None = None


class EngineThread:
    """Owns the engine: submissions arrive on a queue; updates go back to each caller's asyncio queue."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.engine = llm.engine
        if self.engine is None:
            # world_size > 1: the engine lives in rank 0's process and takes one conversation at a time.
            raise ValueError("ad-serve runs with world_size 1 only for now; use the LLM API for several ranks")
        self._inbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ad-engine", daemon=True)
        self._thread.start()

    def submit(self, token_ids: list[int], params: SamplingParams, prompt: str | None) -> asyncio.Queue:
        """Queue a request; returns the asyncio queue that receives its Updates."""
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        self._inbox.put((token_ids, params, prompt, loop, out))
        return out

    def _loop(self) -> None:
        watchers: dict[int, tuple[Any, Any, asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        while not self._stop.is_set():
            block = not self.engine.has_unfinished
            try:
                while True:
                    item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
                    block = False
                    ids, params, prompt, loop, out = item
                    req = self.engine.add_request(ids, params, prompt)
                    watchers[req.request_id] = (req, params, loop, out)
                    if req.is_finished:  # rejected at once (too long, ...)
                        self._publish(req, loop, out)
                        watchers.pop(req.request_id)
            except queue.Empty:
                pass
            if not self.engine.has_unfinished:
                continue
            try:
                changed = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                for rid, (req, _, loop, out) in list(watchers.items()):
                    if not req.is_finished:
                        self.engine.abort(req, f"engine step failed: {e}")
                    self._publish(req, loop, out)
                watchers.clear()
                continue
            for req in changed:
                w = watchers.get(req.request_id)
                if w is None:
                    continue
                self._publish(req, w[2], w[3])
                if req.is_finished:
                    watchers.pop(req.request_id)

    def _publish(self, req: Any, loop: asyncio.AbstractEventLoop, out: asyncio.Queue) -> None:
        text = req.text
        if not req.params.stop:
            text = self.engine.detok.decode(req.output_token_ids, req.params.skip_special_tokens)
        upd = Update(list(req.output_token_ids), text, req.is_finished, req.finish_reason, req.error)
        loop.call_soon_threadsafe(out.put_nowait, upd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
