"""ad-serve under hostile clients: huge bodies, half-open connections, bad fields, full queues, a dead engine.

Two kinds of server: `ad-serve` itself as a process on the bundled model cut to 2 layers (one per module:
the build takes a while), and the same HTTP stack in-process over a fake engine, for what needs a
controlled engine or small limits.
"""

import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402 - after the skip
from ad_cli import server_app  # noqa: E402
from ad_cli.engine_thread import Update  # noqa: E402
from ad_cli.http_limits import ServerLimits, one_line  # noqa: E402
from ad_cli.http_server import bind_socket, make_server  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

HEADER_TIMEOUT = 10.0  # of the ad-serve process: long enough to open 10,000 connections on a busy machine
IDLE_CONNECTIONS = 10_000
MiB = 1024 * 1024


# ---- helpers ------------------------------------------------------------------------------------------


def _status(raw: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3})", raw)
    assert m, raw[:200]
    return int(m.group(1))


def _read_response(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (or the body is complete)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
        head, sep, body = data.partition(b"\r\n\r\n")
        m = re.search(rb"content-length: (\d+)", head, re.I)
        if sep and m and len(body) >= int(m.group(1)):
            break
    return data


def _health_latency(port: int) -> float:
    """Seconds for one GET /health on a new connection (connect included)."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        raw = _read_response(s, 10)
    took = time.perf_counter() - start
    assert _status(raw) == 200, raw
    return took


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


# ---- ad-serve as a process ----------------------------------------------------------------------------


class Served(SimpleNamespace):
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with _server(tmp_path_factory) as srv:
        yield srv


@contextlib.contextmanager
def _server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("ad-serve") / "server.log"
    cmd = [sys.executable, "-m", "ad_cli.serve", "--port", "0", "--header-timeout", str(HEADER_TIMEOUT),
           "--max-connections", str(IDLE_CONNECTIONS + 2000), "--max-queued-requests", "1",
           # Two layers of the bundled model: quick to build; the answers need not be right here.
           # max_seq_len 4096: the queue test's first request must still run (thousands of tokens) however slowly
           # a loaded machine admits the next ones.
           "--args.device=cpu", "--args.model-kwargs.num-hidden-layers=2", "--args.max-seq-len=4096",
           "--args.max-batch-size=1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = None
        deadline = time.monotonic() + 300
        while port is None and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
            port = int(m.group(1)) if m else None
            time.sleep(0.2)
        assert port, log.read_text()
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield Served(proc=proc, port=port, log=log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _send_50mb(port: int, chunked: bool) -> tuple[int, float]:
    """POST a 50 MB body while reading the answer; returns its status and the seconds until it came."""
    size, piece = 50 * 1000 * 1000, b"x" * MiB
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    framing = "transfer-encoding: chunked" if chunked else f"content-length: {size}"
    start = time.perf_counter()
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n{framing}\r\n\r\n"
                 .encode())

    def pump() -> None:
        sent = 0
        try:
            while sent < size:
                n = min(len(piece), size - sent)
                sock.sendall(f"{n:x}\r\n".encode() + piece[:n] + b"\r\n" if chunked else piece[:n])
                sent += n
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server may stop reading once it has answered

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    raw = _read_response(sock)
    took = time.perf_counter() - start
    sender.join(30)
    sock.close()
    return _status(raw), took


@pytest.mark.slow
def test_a_50mb_body_gets_413_quickly_and_costs_no_memory(served: Served) -> None:
    pid = served.proc.pid
    before = _rss_mb(pid)
    for chunked in (False, True):  # a declared length (refused unread) and a counted stream
        status, took = _send_50mb(served.port, chunked)
        print(f"50 MB {'chunked' if chunked else 'with Content-Length'}: {status} after {took * 1000:.0f} ms")
        assert status == 413 and took < 5
    time.sleep(0.5)
    after = _rss_mb(pid)
    print(f"server RSS {before:.0f} MB -> {after:.0f} MB")
    assert after - before < 200
    assert _health_latency(served.port) < 5


@pytest.mark.slow
def test_10000_half_open_connections_leave_health_fast_and_are_closed_by_the_header_timeout(served: Served) -> None:
    _raise_nofile(IDLE_CONNECTIONS + 1000)
    pid = served.proc.pid
    fds_before, log_before = _open_fds(pid), served.log.stat().st_size
    socks: list[socket.socket] = []
    start = time.monotonic()
    try:
        for _ in range(IDLE_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", served.port), timeout=30)
            s.sendall(b"POST /v1/completions HTT")  # a request line that never ends
            socks.append(s)
        # Wait until the server has taken them all from its accept queue: then measure /health. (A few fds of
        # the server come and go: the previous test's last connection may still have been open.)
        accepted = fds_before + IDLE_CONNECTIONS - 10
        while _open_fds(pid) < accepted and time.monotonic() - start < HEADER_TIMEOUT - 2:
            time.sleep(0.05)
        opened = time.monotonic() - start
        assert _open_fds(pid) >= accepted, "the server did not accept the connections in time"
        latencies = sorted(_health_latency(served.port) for _ in range(5))
        print(f"{IDLE_CONNECTIONS} idle connections opened in {opened:.1f} s; /health took "
              f"{', '.join(f'{t * 1000:.1f}' for t in latencies)} ms")
        assert latencies[2] < 0.1  # the median: one probe may meet a scheduling hiccup on a loaded machine
        assert time.monotonic() - start < HEADER_TIMEOUT, "too slow to measure before the timeout"
        # Nothing was closed before the timeout ...
        sel = selectors.DefaultSelector()
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        assert not sel.select(0)
        # ... and every one is answered 408 and closed by it.
        answered, closed = 0, 0
        deadline = start + HEADER_TIMEOUT + 30
        while closed < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(1):
                try:
                    data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if data.startswith(b"HTTP/1.1 408"):
                    answered += 1
                    assert b"did not arrive within" in data
                if not data or data.endswith(b"}"):
                    sel.unregister(key.fileobj)
                    closed += 1
        took = time.monotonic() - start
        print(f"closed {closed} (408: {answered}) after {took:.1f} s")
        assert closed == answered == IDLE_CONNECTIONS
    finally:
        for s in socks:
            s.close()
    time.sleep(1.0)
    assert _open_fds(pid) < fds_before + 100  # the server let them all go
    assert _health_latency(served.port) < 5
    grew = served.log.stat().st_size - log_before
    print(f"the log grew by {grew} bytes")
    assert grew < 20_000  # a few rate-limited lines, not one per connection


GOOD = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", '{"prompt": "hi", "seed": 1180591620717411303424}', "seed"),
        ("/v1/completions", '{"prompt": "hi", "seed": -1}', "seed"),
        ("/v1/completions", '{"prompt": "hi", "temperature": Infinity}', "temperature"),
        ("/v1/completions", '{"prompt": "hi", "temperature": 1e999}', "temperature"),
        ("/v1/completions", '{"prompt": "hi", "temperature": NaN}', "temperature"),
        ("/v1/completions", '{"prompt": "hi", "top_p": -Infinity}', "top_p"),
        ("/v1/completions", '{"prompt": "hi", "top_p": NaN}', "top_p"),
        ("/v1/completions", '{"prompt": "\\ud800"}', "prompt"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
        ("/v1/completions", '{"prompt": "hi", "stop": ["ok", null]}', "stop.1"),
        ("/v1/completions", '{"prompt": "hi", "stop": [7]}', "stop.0"),
        ("/v1/completions", '{"prompt": "hi", "stop": "\\udfff"}', "stop.0"),
        ("/v1/completions", '{"prompt": "hi", "max_tokens": -5}', "max_tokens"),
        ("/v1/completions", '{"prompt": "hi", "max_tokens": 100000000000000000000}', "max_tokens"),
        ("/v1/completions", '{"prompt": "hi", "max_tokens": 100000}', "max_tokens"),  # > max_seq_len
        ("/v1/completions", '{"prompt": "hi", "top_k": -1}', "top_k"),
        ("/v1/completions", '{"prompt": [1, 99999999]}', "prompt"),
        ("/v1/completions", '{"prompt": []}', "prompt"),
        ("/v1/completions", '{"prompt": "hi", "max_tokens": 2', None),  # not JSON
        ("/v1/completions", '[1, 2]', None),
    ],
)
def test_a_bad_field_is_400_naming_it_and_the_next_request_succeeds(served: Served, route: str, body: str,
                                                                      param: str | None) -> None:
    with httpx.Client(base_url=served.base, timeout=120) as client:
        r = client.post(route, content=body.encode(), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param
        assert "\n" not in err["message"]
        if param:
            assert err["message"].startswith(param.split(".")[0])
        ok = client.post("/v1/completions", json=GOOD)
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] == 4


@pytest.mark.slow
def test_bad_requests_do_not_disturb_a_running_one_and_the_largest_seed_works(served: Served) -> None:
    with httpx.Client(base_url=served.base, timeout=120) as a, httpx.Client(base_url=served.base, timeout=120) as b:
        with a.stream("POST", "/v1/completions", json={**GOOD, "max_tokens": 12, "stream": True}) as running:
            assert running.status_code == 200
            for body in ('{"prompt": "hi", "seed": 1180591620717411303424}', '{"prompt": "\\ud800"}',
                         '{"prompt": "hi", "temperature": Infinity}'):
                assert b.post("/v1/completions", content=body.encode()).status_code == 400
            events = [line for line in running.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
        r = b.post("/v1/completions", json={**GOOD, "seed": 2**64 - 1, "temperature": 0.8})
        assert r.status_code == 200, r.text


@pytest.mark.slow
def test_max_queued_requests_answers_503_and_frees_up(served: Served) -> None:
    # max_batch_size 1 and --max-queued-requests 1: one request runs, one waits, the third is refused.
    # 4000 tokens: minutes on this CPU, so the first still runs when the third arrives (the streams are closed,
    # and their requests aborted, right after the check).
    long = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "temperature": 0, "stream": True}
    clients = [httpx.Client(base_url=served.base, timeout=120) for _ in range(3)]
    try:
        # Requests of earlier tests (aborted streams) are gone before this one counts the engine's requests.
        assert _wait_for_load(clients[2], running=0, waiting=0), _load(clients[2])
        with clients[0].stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a closed line iterator would close the connection
            next(line for line in lines if line.startswith("data: "))  # it runs
            with clients[1].stream("POST", "/v1/completions", json=long) as waiting:
                assert waiting.status_code == 200  # submitted (headers come after submission)
                # The engine's own counts, not timing: one running, one waiting, before the third is sent.
                assert _wait_for_load(clients[2], running=1, waiting=1), _load(clients[2])
                try:
                    r = clients[2].post("/v1/completions", json=GOOD, timeout=60)
                except httpx.TimeoutException:
                    pytest.fail(f"the third request was admitted instead of refused; load now {_load(clients[2])}")
                assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                err = r.json()["error"]
                assert err["type"] == "server_error" and "waiting" in err["message"]
                assert clients[2].get("/health").status_code == 200  # busy is not unhealthy
        # Both streams were closed by their clients: aborted, their places free again.
        deadline = time.monotonic() + 30
        while (r := clients[2].post("/v1/completions", json=GOOD)).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.status_code == 200, r.text
    finally:
        for c in clients:
            c.close()


def _load(client: httpx.Client) -> dict[str, float]:
    """The server's running and waiting request counts, from /metrics."""
    text = client.get("/metrics").text
    found = {}
    for family in text_string_to_metric_families(text):
        for name in ("running", "waiting"):
            if family.name == f"ad_num_requests_{name}":
                found[name] = family.samples[0].value
    return found


def _wait_for_load(client: httpx.Client, running: int, waiting: int, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _load(client) == {"running": running, "waiting": waiting}:
            return True
        time.sleep(0.05)
    return False


# ---- the same HTTP stack in-process, over a fake engine -------------------------------------------------


class FakeEngine:
    """EngineThread's contract with a scripted answer and health."""

    def __init__(self) -> None:
        self.problem: str | None = None
        self.answer = Update([5, 6], "ok", True, "stop")
        self.submitted = 0
        self.num_waiting = 0

    def submit(self, ids: list[int], params: Any, prompt: str | None, stream: bool = True) -> asyncio.Queue:
        self.submitted += 1
        q: asyncio.Queue = asyncio.Queue()
        q.put_nowait(self.answer)
        return q

    def abort(self, q: asyncio.Queue) -> None:
        pass

    def health(self) -> str | None:
        return self.problem

    def close(self) -> None:
        pass


class SlowTokenizerLLM:
    """Enough of LLM for the app: encoding a prompt that says "slow" takes a second (as a huge one would)."""

    args = SimpleNamespace(max_seq_len=64, max_batch_size=2)
    vocab_size = 100
    engine = None

    def encode(self, prompt: Any) -> tuple[list[int], str | None]:
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
        if "slow" in text:
            time.sleep(1.0)
        return [1, 2, 3], text


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Start `build_app` over a FakeEngine behind the guarded uvicorn server; yields a starter."""
    servers: list[tuple[Any, threading.Thread]] = []

    def start(limits: ServerLimits) -> tuple[int, FakeEngine]:
        engine = FakeEngine()
        monkeypatch.setattr(server_app, "start_engine", lambda llm, metrics=None: engine)
        app = server_app.build_app(SlowTokenizerLLM(), "fake", default_max_tokens=4, limits=limits)
        sock = bind_socket("127.0.0.1", 0)
        server = make_server(app, limits, log_level="warning")
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started
        servers.append((server, thread))
        return sock.getsockname()[1], engine

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def _post(port: int, path: str, body: dict, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}{path}", json=body, timeout=timeout)


def test_health_reports_a_dead_engine_and_requests_get_503(in_process: Any) -> None:
    port, engine = in_process(ServerLimits())
    assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
    engine.problem = "the engine stopped: RuntimeError: CUDA error\n  more detail"
    r = httpx.get(f"http://127.0.0.1:{port}/health")
    assert r.status_code == 503 and r.json() == {"status": "unavailable",
                                                 "reason": "the engine stopped: RuntimeError: CUDA error"}
    r = _post(port, "/v1/completions", {"prompt": "hi"})
    assert r.status_code == 503 and "the engine stopped" in r.json()["error"]["message"]
    assert engine.submitted == 0
    engine.problem = None
    assert _post(port, "/v1/completions", {"prompt": "hi"}).status_code == 200


def test_a_500_carries_one_line_without_traceback_or_paths(in_process: Any) -> None:
    port, engine = in_process(ServerLimits())
    trace = ('rank 1 failed: Traceback (most recent call last):\n  File "/work/main/packages/ad-runtime/src/'
             'ad_runtime/executor/engine.py", line 12, in step\n    x = y\n'
             'RuntimeError: bad thing in /work/main/packages/ad-runtime/src/ad_runtime/executor/engine.py\n')
    engine.answer = Update([], "", True, "error", trace, internal=True)
    r = _post(port, "/v1/completions", {"prompt": "hi"})
    assert r.status_code == 500
    message = r.json()["error"]["message"]
    assert message == "rank 1 failed: RuntimeError: bad thing in engine.py"
    assert one_line("a\nb") == "a"


def test_tokenisation_runs_off_the_event_loop(in_process: Any) -> None:
    port, _ = in_process(ServerLimits())
    slow = threading.Thread(target=_post, args=(port, "/v1/chat/completions",
                                                {"messages": [{"role": "user", "content": "slow"}]}))
    slow.start()
    time.sleep(0.2)  # the request is being tokenised now (for a second)
    try:
        latencies = sorted(_health_latency(port) for _ in range(3))
    finally:
        slow.join(30)
    assert latencies[1] < 0.1, latencies


def test_header_and_body_timeouts_answer_408_and_close(in_process: Any) -> None:
    port, _ = in_process(ServerLimits(header_timeout=0.5, body_timeout=0.5))
    with socket.create_connection(("127.0.0.1", port)) as s:  # headers never finish
        s.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\n")
        raw = _read_response(s, 10)
        assert _status(raw) == 408 and b"request headers" in raw
        assert s.recv(10) == b""
    with socket.create_connection(("127.0.0.1", port)) as s:  # nothing at all: closed without a word
        s.settimeout(10)
        assert s.recv(10) == b""
    with socket.create_connection(("127.0.0.1", port)) as s:  # a kept-alive connection's next request too
        s.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
        assert _status(_read_response(s, 10)) == 200
        s.sendall(b"GET /heal")
        assert _status(_read_response(s, 10)) == 408
    with socket.create_connection(("127.0.0.1", port)) as s:  # a body that stops half-way
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n{\"prompt\":")
        raw = _read_response(s, 10)
        assert _status(raw) == 408 and b"request body" in raw


def test_connection_cap_makes_room_from_idle_connections_then_answers_503(in_process: Any) -> None:
    port, _ = in_process(ServerLimits(max_connections=3, header_timeout=30, body_timeout=30))
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    idle[0].sendall(b"GET /hea")  # the oldest, part of a request sent: it gets a 408 when dropped
    time.sleep(0.2)
    # A new client is served: the oldest idle connection makes room.
    assert _health_latency(port) < 5
    assert _status(_read_response(idle[0], 10)) == 408
    # Connections inside a request (headers in, body coming) are never dropped: past the cap, 503.
    busy = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    for s in busy:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 50\r\n\r\n{")
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", port)) as s:
        raw = _read_response(s, 10)
    assert _status(raw) == 503 and b"maximum of 3 connections" in raw
    for s in idle + busy:
        s.close()
    time.sleep(0.3)
    assert _health_latency(port) < 5


def test_small_body_limit_in_process(in_process: Any) -> None:
    port, engine = in_process(ServerLimits(max_body_bytes=1000))
    r = _post(port, "/v1/completions", {"prompt": "x" * 2000})
    assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]
    assert _post(port, "/v1/completions", {"prompt": "x" * 100}).status_code == 200
    assert engine.submitted == 1


def test_log_lines_of_one_kind_are_rate_limited() -> None:
    from ad_cli.http_limits import RateLimitFilter

    f = RateLimitFilter(rate=1.0, burst=3)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, msg, None, None)

    passed = [f.filter(record("Invalid HTTP request received.")) for _ in range(1000)]
    assert sum(passed) == 3
    assert f.filter(record("another kind"))  # each kind has its own budget
    f._buckets[("uvicorn.error", "Invalid HTTP request received.")][1] -= 1.0  # a second later
    later = record("Invalid HTTP request received.")
    assert f.filter(later) and "997 similar message(s) suppressed" in later.getMessage()
