"""ad-serve's HTTP stack (uvicorn over `build_app`) on a free port in a thread of the test process, for test files
that only send requests to a server."""

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def serve_in_thread(llm: Any, model: str, limits: Any, name: str, keep_alive_s: float | None = None,
                    **app_kwargs: Any) -> Iterator[str]:
    """Serve `llm` until the block ends (then stop the server and shut the LLM down); yields the base URL."""
    from ad_cli.http_server import bind_socket, make_server
    from ad_cli.server_app import build_app

    app = build_app(llm, model, limits=limits, **app_kwargs)
    sock = bind_socket("127.0.0.1", 0)
    srv = make_server(app, limits, log_level="warning")
    if keep_alive_s is not None:
        srv.config.timeout_keep_alive = keep_alive_s
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not srv.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(30)
        llm.shutdown()
