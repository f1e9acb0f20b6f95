"""ad-serve's HTTP server: uvicorn with an h11 protocol that times out slow headers and caps connections.

Why a subclass of uvicorn's h11 protocol rather than another server: uvicorn already serves the app (and its
tests), is in the lock, and its protocol is small; what it lacks is narrow. It never times out a connection
that has not finished its request headers (a few thousand half-open sockets exhaust the file descriptors),
and its `limit_concurrency` answers 503 only once a request's headers have arrived, so idle connections are
not counted against anyone. Hypercorn has read timeouts but would be a second server to trust and test. The
request body (size and read time) is limited in the ASGI layer (http_limits.BodyLimitMiddleware), where
the in-process test client sees the same limits.
"""

import asyncio
import logging
import resource
import socket
from dataclasses import replace
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .http_limits import EventTally, ServerLimits, limit_log_rates, raw_response

logger = logging.getLogger("ad_cli.http")

# How long a connection whose response was sent before its request body ended keeps reading (and dropping)
# what the client still sends, so the client reads the answer (a 413) instead of a reset.
LINGER_S = 2.0
# File descriptors kept free of connections: model files, pipes, threads, the listening socket, logs.
FD_RESERVE = 256


class _Transport:
    """The connection's transport, except that closing while the client is still sending its body lingers."""

    def __init__(self, raw: asyncio.Transport, protocol: "GuardedH11Protocol"):
        self._raw = raw
        self._protocol = protocol
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        raw = self._raw
        if self._protocol.conn.their_state is h11.SEND_BODY and not raw.is_closing() and raw.can_write_eof():
            # A reset (what closing with unread input sends) may destroy the answer in the client's buffer.
            self._protocol.lingering = True
            raw.write_eof()
            raw.resume_reading()
            self._protocol.loop.call_later(LINGER_S, raw.close)
        else:
            raw.close()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout (408, or a plain close if nothing arrived) and a cap on
    connections (the oldest idle connection makes room; with none idle, 503). Configured by `guarded_protocol`.
    """

    limits: ServerLimits = ServerLimits()
    # Connections with no request in progress (new, or kept alive between requests), oldest first; shared
    # by every connection of one server (a dict keeps insertion order).
    idle: dict["GuardedH11Protocol", None] = {}
    tally: EventTally = EventTally(logger)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lingering = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._got_bytes = False  # of the request in progress (for: 408, or close without a word)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            victim = next(iter(self.idle), None)
            if victim is None:
                self.tally.note("503 too many connections")
                self._answer_and_close(503, f"the server has its maximum of {self.limits.max_connections} "
                                            "connections open; try again")
                return
            self.tally.note("closed idle connection to make room")
            victim._end_idle("the server needed this idle connection for another client")
        self.idle[self] = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return  # the answer is sent; what still arrives is dropped
        if self.conn.their_state is h11.IDLE:
            self._got_bytes = True
            if self._header_timer is None and not self.transport.is_closing():
                # A kept-alive connection starts its next request: its headers get the same time.
                self._arm_header_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._stop_header_timer()
            self.idle.pop(self, None)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._got_bytes = False
            self.idle.pop(self, None)
            self.idle[self] = None  # kept alive: idle again, newest (uvicorn's keep-alive timer ends it)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        self.idle.pop(self, None)
        super().connection_lost(exc)

    # ---- helpers -------------------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._stop_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        self.tally.note("408 request headers timeout")
        self._end_idle(f"the request headers did not arrive within {self.limits.header_timeout:g} s")

    def _end_idle(self, why: str) -> None:
        """Close a connection with no request in progress: 408 if part of a request came, else silently."""
        if self._got_bytes:
            self._answer_and_close(408, why)
        else:
            self._close()

    def _answer_and_close(self, status: int, message: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(raw_response(status, message))
        self._close()

    def _close(self) -> None:
        self._stop_header_timer()
        self.idle.pop(self, None)
        self.transport.close()


def guarded_protocol(limits: ServerLimits) -> type[GuardedH11Protocol]:
    """A protocol class bound to `limits`, with its own registry of idle connections (one per server)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "idle": {},
                                                              "tally": EventTally(logger)})


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def effective_limits(limits: ServerLimits) -> ServerLimits:
    """`limits` with max_connections lowered so connections can never take every file descriptor."""
    fds = raise_fd_limit()
    cap = max(16, fds - FD_RESERVE)
    if limits.max_connections > cap:
        logger.warning("max connections lowered from %d to %d (the open-files limit is %d)",
                       limits.max_connections, cap, fds)
        return replace(limits, max_connections=cap)
    return limits


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port but not yet listening (connections are refused until the server starts).

    Raises OSError with a readable message when the address is unknown, taken or not allowed.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot resolve host {host!r}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def make_server(app: Any, limits: ServerLimits, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for `app` with `limits` enforced below the app; run it with `.run(sockets=[sock])`."""
    config = uvicorn.Config(
        app,
        http=guarded_protocol(limits),
        ws="none",  # no WebSocket routes: an upgrade request is an ordinary (404) request
        lifespan="on",
        log_level=log_level,
        timeout_keep_alive=5,
        backlog=2048,
    )
    limit_log_rates()  # after uvicorn configured its loggers
    return uvicorn.Server(config)


def serve(app: Any, sock: socket.socket, limits: ServerLimits, log_level: str = "info") -> None:
    """Run `app` on the bound socket until interrupted."""
    limits = effective_limits(limits)
    server = make_server(app, limits, log_level)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    logger.info("listening on http://%s:%d (max %d connections, %d-byte bodies, %gs header / %gs body "
                "timeouts, %d queued requests)", shown, port, limits.max_connections, limits.max_body_bytes,
                limits.header_timeout, limits.body_timeout, limits.max_queued_requests)
    server.run(sockets=[sock])
