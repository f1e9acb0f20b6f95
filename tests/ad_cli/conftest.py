"""A server shared by the test files that only send requests to it (structured output, metrics), built once a session."""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass
class SharedServer:
    url: str  # base URL, without /v1
    key: str  # the server's --api-key
    model: str


@pytest.fixture(scope="session")
def shared_server() -> Iterator[SharedServer]:
    """ad-serve's stack (uvicorn, `build_app`, the engine thread) with an API key, on a free port in a thread of
    this process, over the bundled model cut to 2 layers (gibberish but deterministic answers), 24 requests a batch."""
    pytest.importorskip("fastapi")
    from ad_cli.http_limits import ServerLimits
    from ad_cli.http_server import bind_socket, make_server
    from ad_cli.server_app import build_app
    from ad_runtime import LLM

    key, model = "sk-shared-0123456789", "smollm2-2-layers"
    llm = LLM(device="cpu", max_seq_len=256, max_batch_size=24, model_kwargs={"num_hidden_layers": 2})
    limits = ServerLimits(header_timeout=60, body_timeout=60)  # a busy machine must not turn a slow read into 408
    app = build_app(llm, model, default_max_tokens=16, limits=limits, api_key=key)
    sock = bind_socket("127.0.0.1", 0)
    srv = make_server(app, limits, log_level="warning")
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="shared-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not srv.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.started, "the server did not start"
        yield SharedServer(f"http://127.0.0.1:{sock.getsockname()[1]}", key, model)
    finally:
        srv.should_exit = True
        thread.join(30)
        llm.shutdown()
