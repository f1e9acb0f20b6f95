"""The OpenAI-compatible server in-process on the bundled model: routes, streaming, errors, concurrency."""

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402 - after the skip

pytestmark = pytest.mark.slow

MODEL = "smollm2-test"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    from ad_cli.server_app import build_app
    from ad_runtime import LLM

    # All 30 layers: the Paris answer needs the real model. A short max_seq_len keeps the KV-cache
    # sizing pass small on the CPU.
    llm = LLM(device="cpu", max_seq_len=128, max_batch_size=4)
    try:
        with TestClient(build_app(llm, MODEL, default_max_tokens=24)) as c:
            yield c
    finally:
        llm.shutdown()


def _sse(text: str) -> list[Any]:
    """The `data:` payloads of an event stream, JSON-decoded except the final [DONE]."""
    out: list[Any] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_health_and_models(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]


def test_chat_completion_answers_paris(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={"messages": CAPITAL, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streaming_chat_concatenates_to_the_non_streaming_text(client: TestClient) -> None:
    req = {"messages": CAPITAL, "max_tokens": 20, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
    r = client.post("/v1/chat/completions", json={**req, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _sse(r.text)
    assert events[-1] == "[DONE]" and len(events) > 2
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_text_completion_plain_and_streaming(client: TestClient) -> None:
    req = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}
    body = client.post("/v1/completions", json=req).json()
    assert body["object"] == "text_completion"
    text = body["choices"][0]["text"]
    assert text and body["usage"]["completion_tokens"] == 6  # no chat template: runs to max_tokens
    events = _sse(client.post("/v1/completions", json={**req, "stream": True}).text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text


def test_token_id_prompt(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": [1, 504, 3458], "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                                 "prompt_tokens_details": {"cached_tokens": 0}}


@pytest.mark.parametrize(
    ("body", "route", "needle"),
    [
        ({"prompt": "hi", "max_tokens": 0}, "/v1/completions", "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, "/v1/completions", "temperature"),
        ({"max_tokens": 4}, "/v1/chat/completions", "messages"),
        ({"prompt": "hi", "top_k": -2}, "/v1/completions", "top_k"),
        ({"prompt": [7] * 200, "max_tokens": 4}, "/v1/completions", "max_seq_len"),
    ],
)
def test_bad_request_is_400_with_a_clear_message(client: TestClient, body: dict, route: str, needle: str) -> None:
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_two_concurrent_requests_both_finish(client: TestClient) -> None:
    results: dict[int, Any] = {}

    def ask(i: int, content: str) -> None:
        req = {"messages": [{"role": "user", "content": content}], "max_tokens": 12, "temperature": 0}
        results[i] = client.post("/v1/chat/completions", json=req)

    threads = [threading.Thread(target=ask, args=(0, "What is the capital of France?")),
               threading.Thread(target=ask, args=(1, "Name a color."))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == [0, 1]
    for r in results.values():
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["message"]["content"] and choice["finish_reason"] in ("stop", "length")
    assert "Paris" in results[0].json()["choices"][0]["message"]["content"]
    assert client.get("/health").status_code == 200  # the engine thread is still serving
