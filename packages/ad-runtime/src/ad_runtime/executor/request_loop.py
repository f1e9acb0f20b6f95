"""The one serving loop: takes requests between steps, steps while any is unfinished, publishes what changed.

The server's engine thread (updates to asyncio queues) and rank 0 of a multi-process run (updates over a pipe)
both drive their EngineCore through this loop; they differ only in how messages arrive and updates leave.

Messages (from `receive`):
    ("add", key, prompt_ids, params, text, stream)   a new request; `key` names it to its caller
    ("abort", key)                                   its caller stopped listening
    ("stop",)                                        end the loop
Updates (to `publish(key, request)`): after every step that changed a streaming request, and once when any
request ends (also when it is refused at once). `publish` returns False when nobody listens any more: the
request is then aborted. An optional `observe(key, request)` sees every watched request a step changed, streaming
or not (the server's metrics), before it is published.
"""

from collections.abc import Callable, Hashable, Iterable

from .core import EngineCore
from .request import Request

# Why a request ended when its caller stopped listening (a closed stream, a client that went away).
ABORT_MESSAGE = "aborted: the caller stopped listening"

Receive = Callable[[bool], Iterable[tuple]]  # receive(block) -> the messages that arrived (waits for one if block)
Publish = Callable[[Hashable, Request], bool]
Observe = Callable[[Hashable, Request], None]


class RequestLoop:
    """Runs an EngineCore on the caller's thread until a "stop" message (or `receive` raises)."""

    def __init__(self, core: EngineCore, receive: Receive, publish: Publish, observe: Observe | None = None):
        self.core = core
        self.receive = receive
        self.publish = publish
        self.observe = observe
        self.watchers: dict[int, tuple[Hashable, bool, Request]] = {}  # request id -> (key, stream, request)
        self.by_key: dict[Hashable, int] = {}  # key -> request id, for aborts

    def run(self) -> None:
        while True:
            # Block only when idle; while requests run, whatever arrived joins the next step (continuous batching).
            for msg in self.receive(not self.core.has_unfinished):
                if msg[0] == "stop":
                    return
                self._handle(msg)
            if not self.core.has_unfinished:
                continue
            for req in self.core.step():
                self._deliver(req)

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "add":
            _, key, ids, params, text, stream = msg
            req = self.core.submit(ids, params, text)
            if req.is_finished:  # refused at once (too long, ...)
                self.publish(key, req)
            else:
                self.watchers[req.request_id] = (key, stream, req)
                self.by_key[key] = req.request_id
        elif msg[0] == "abort":
            rid = self.by_key.pop(msg[1], None)
            if rid is not None:
                self.core.abort(self.watchers.pop(rid)[2], ABORT_MESSAGE)
        else:
            raise ValueError(f"the request loop got an unknown message {msg[0]!r}")

    def _deliver(self, req: Request) -> None:
        w = self.watchers.get(req.request_id)
        if w is None:
            return
        key, stream, _ = w
        if self.observe is not None:
            self.observe(key, req)
        if (stream or req.is_finished) and not self.publish(key, req) and not req.is_finished:
            self.core.abort(req, ABORT_MESSAGE)  # nobody listens any more
        if req.is_finished:
            del self.watchers[req.request_id]
            self.by_key.pop(key, None)

    def fail_all(self, message: str) -> list[tuple[Hashable, Request]]:
        """Abort every watched request (the loop itself broke); returns (key, request) pairs to tell their callers."""
        out = []
        for key, _, req in self.watchers.values():
            self.core.abort(req, message)
            out.append((key, req))
        self.watchers.clear()
        self.by_key.clear()
        return out
