"""Limits that keep one HTTP client from hurting the others: request body size and read time, and quiet logs."""

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

logger = logging.getLogger("ad_cli.http")


@dataclass(frozen=True)
class ServerLimits:
    """What one client may take from the server; `ad-serve` exposes each as an option."""

    # A chat of a few thousand turns fits in 1 MiB of JSON; 4 MiB leaves room and bounds what one request
    # (JSON parse, validation, tokenisation) can cost.
    max_body_bytes: int = 4 * 1024 * 1024
    # Seconds from a connection's first byte (or its opening) until its request headers are complete.
    header_timeout: float = 10.0
    # Seconds from the end of the headers until the whole body has arrived (a total, so a trickle cannot
    # keep a request open forever).
    body_timeout: float = 30.0
    # Open connections at once; beyond it an idle connection is dropped to make room, else the newcomer
    # gets 503. Capped below the process's file-descriptor limit by the server.
    max_connections: int = 1024
    # Requests waiting in the engine (admitted, not yet running) at once; beyond it new requests get 503.
    max_queued_requests: int = 256


def error_object(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def raw_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection (for answers given below the ASGI app)."""
    body = json.dumps(error_object(status, message)).encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if status == 503:
        head.append("retry-after: 1")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.\-+@~]+)+[\\/]([\w.\-+@~]+)")


_TRACEBACK = "Traceback (most recent call last):"


def one_line(message: str) -> str:
    """An error message as one line without file paths: a traceback becomes its last line (the error)."""
    text = str(message)
    head, tb, rest = text.partition(_TRACEBACK)
    if tb:
        # The error is the last line that is not indented (frames and code lines are).
        tail = next((ln for ln in reversed(rest.splitlines()) if ln.strip() and not ln[:1].isspace()), "")
        head = head.strip().splitlines()[-1].rstrip(": ") if head.strip() else ""
        line = f"{head}: {tail.strip()}" if head and tail else (head or tail.strip())
    else:
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = _PATH.sub(r"\1", line) or "internal error"  # /a/b/c.py -> c.py: where our files live is ours
    return line if len(line) <= 500 else line[:497] + "..."


async def send_error(send: Send, status: int, message: str, close: bool = True, code: str | None = None,
                     extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Answer with OpenAI's error body (and `extra` headers); `close` asks the server to drop the connection after."""
    body = json.dumps(error_object(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _TooLarge(Exception):
    pass


def header_value(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (`name` in lower case), or None."""
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v
    return None


class BodyLimitMiddleware:
    """Reads a request's body before the app sees it: at most `max_body_bytes` (413), within `body_timeout` (408).

    A declared Content-Length above the limit is refused before a byte of the body is read; a chunked body is
    counted as it arrives and refused as soon as it passes the limit, so memory stays bounded by the limit.
    The app then gets the body in one message, and the connection's later messages (a disconnect) as usual.
    """

    def __init__(self, app: Any, max_body_bytes: int, body_timeout: float):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.tally = EventTally(logger)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = header_value(scope, b"content-length")
        chunked = header_value(scope, b"transfer-encoding") is not None
        if length is None and not chunked:  # no body (GET /health): nothing to read
            await self.app(scope, receive, send)
            return
        if length is not None and not chunked:
            try:
                declared = int(length)
            except ValueError:
                await send_error(send, 400, "invalid Content-Length header")
                return
            if declared > self.max_body_bytes:
                self.tally.note("413 request body too large")
                await send_error(send, 413, f"the request body ({declared} bytes) is larger than the server's "
                                            f"limit of {self.max_body_bytes} bytes")
                return
        try:
            body = await asyncio.wait_for(self._read(receive), self.body_timeout)
        except TimeoutError:
            self.tally.note("408 request body timeout")
            await send_error(send, 408, f"the request body did not arrive within {self.body_timeout:g} s")
            return
        except _TooLarge:
            self.tally.note("413 request body too large")
            await send_error(send, 413, f"the request body is larger than the server's limit of "
                                        f"{self.max_body_bytes} bytes")
            return
        if body is None:  # the client went away
            return
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _TooLarge
            if chunk:
                parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


class EventTally:
    """Counts repeated events (timeouts, refusals) and logs each kind at most once per `interval` seconds.

    A flood of bad clients then costs one log line per kind and interval, not one per client.
    """

    def __init__(self, log: logging.Logger, interval: float = 10.0):
        self.log = log
        self.interval = interval
        self._counts: dict[str, int] = {}
        self._last: dict[str, float] = {}
        self._flush_armed: set[str] = set()

    def note(self, kind: str) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) >= self.interval:
            self._emit(kind, now)
        elif kind not in self._flush_armed:
            # Report the rest of the burst once the interval is over, even if nothing else happens.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._flush_armed.add(kind)
            loop.call_later(self.interval - (now - self._last[kind]), self._flush, kind)

    def _flush(self, kind: str) -> None:
        self._flush_armed.discard(kind)
        if self._counts.get(kind):
            self._emit(kind, time.monotonic())

    def _emit(self, kind: str, now: float) -> None:
        n = self._counts.pop(kind, 0)
        self._last[kind] = now
        if n:
            self.log.warning("%s: %d connection(s) in the last %g s", kind, n, self.interval)


class RateLimitFilter(logging.Filter):
    """Lets through at most `burst` records of one kind (logger and message template), then `rate` per second.

    The first record after some were dropped says how many, so nothing is hidden silently.
    """

    def __init__(self, rate: float = 1.0, burst: int = 20):
        super().__init__()
        self.rate = rate
        self.burst = burst
        self._buckets: dict[tuple[str, Any], list[float]] = {}  # key -> [tokens, last refill, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg if isinstance(record.msg, str) else type(record.msg))
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 1000:  # unbounded message texts must not grow this forever
                self._buckets.clear()
            bucket = self._buckets[key] = [float(self.burst), now, 0]
        bucket[0] = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if bucket[0] < 1.0:
            bucket[2] += 1
            return False
        bucket[0] -= 1.0
        if bucket[2]:
            dropped, bucket[2] = int(bucket[2]), 0
            record.msg = f"{record.msg} [{dropped} similar message(s) suppressed]"  # no '%': safe with args
        return True


def limit_log_rates() -> None:
    """Install one RateLimitFilter on each of the server's loggers (once).

    Warnings and errors (a bad request, an exception in the app, accept() out of file descriptors): one per
    second after a burst of 20. The access log: one line per request up to 100 a second, so a flood of
    requests cannot fill the disk while ordinary traffic is logged in full.
    """
    for name, rate, burst in (("uvicorn", 1.0, 20), ("uvicorn.error", 1.0, 20), ("asyncio", 1.0, 20),
                              ("ad_cli.http", 1.0, 20), ("uvicorn.access", 100.0, 500)):
        log = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in log.filters):
            log.addFilter(RateLimitFilter(rate, burst))
