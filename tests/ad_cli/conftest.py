"""A server shared by the test files that only send requests to it (structured output, metrics), built once a session."""

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
    from ad_runtime import LLM
    from server_harness import serve_in_thread

    key, model = "sk-shared-0123456789", "smollm2-2-layers"
    llm = LLM(device="cpu", max_seq_len=256, max_batch_size=24, model_kwargs={"num_hidden_layers": 2})
    limits = ServerLimits(header_timeout=60, body_timeout=60)  # a busy machine must not turn a slow read into 408
    with serve_in_thread(llm, model, limits, "shared-server", default_max_tokens=16, api_key=key) as url:
        yield SharedServer(url, key, model)
