"""ad-serve's app over LLM(world_size=2) on gloo CPU ranks, and over LLM(engine_process=True) (the engine alone in a
process of its own): concurrent requests answer like one in-process rank."""

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
from ad_runtime import LLM, SamplingParams  # noqa: E402 - after the skip
from fastapi.testclient import TestClient  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "smollm2-world2"
# The bundled SmolLM2 cut to 2 layers (real weights for those), fp32: quick to build on 2 CPU ranks.
COMMON = dict(device="cpu", dtype="float32", model_kwargs={"num_hidden_layers": 2}, max_seq_len=96,
              max_batch_size=4, attn_page_size=16)
MAX_TOKENS = 8
COMPLETIONS = ["The capital of France is", "1, 2, 3, 4,"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def one_rank_texts() -> list[str]:
    """Greedy answers of one rank: the two completions (no chat template), then the chat."""
    with LLM(world_size=1, **COMMON) as llm:
        outs = llm.generate([*COMPLETIONS, CHAT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0),
                            chat_template=False)
        return [o.outputs[0].text for o in outs]


@pytest.fixture(scope="module", params=[{"world_size": 2}, {"engine_process": True}], ids=["world2", "engine-process"])
def client(request: pytest.FixtureRequest) -> Iterator[TestClient]:
    from ad_cli.server_app import build_app

    llm = LLM(**request.param, **COMMON)
    try:
        with TestClient(build_app(llm, MODEL, default_max_tokens=MAX_TOKENS)) as c:
            yield c
    finally:
        llm.shutdown()


def _streamed_text(body: str) -> str:
    payloads = [line[len("data: "):] for line in body.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]" and len(payloads) > 2
    return "".join(json.loads(p)["choices"][0]["delta"]["content"] for p in payloads[:-1])


def test_concurrent_completions_and_a_stream_answer_like_one_rank(client: TestClient, one_rank_texts: list[str]) -> None:
    results: dict[int, Any] = {}
    barrier = threading.Barrier(3)

    def post(i: int, route: str, body: dict) -> None:
        barrier.wait()
        results[i] = client.post(route, json={**body, "temperature": 0})

    jobs = [(i, "/v1/completions", {"prompt": p}) for i, p in enumerate(COMPLETIONS)]
    jobs.append((2, "/v1/chat/completions", {"messages": CHAT, "stream": True}))
    threads = [threading.Thread(target=post, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == [0, 1, 2]
    for i in range(3):
        assert results[i].status_code == 200, results[i].text
    assert [results[i].json()["choices"][0]["text"] for i in range(2)] == one_rank_texts[:2]
    assert _streamed_text(results[2].text) == one_rank_texts[2]


def test_rejected_request_is_400(client: TestClient) -> None:
    # Rank 0 rejects it at once; the reason travels back through the pipe.
    r = client.post("/v1/completions", json={"prompt": [7] * 200, "max_tokens": 4})
    assert r.status_code == 400 and "max_seq_len" in r.json()["error"]["message"]


def test_structured_output_and_metrics_over_two_ranks(client: TestClient) -> None:
    """Rank 0's engine masks by the grammar; /metrics counts what reaches this process and rank 0's counts."""
    pytest.importorskip("xgrammar")
    from prometheus_client.parser import text_string_to_metric_families

    r = client.post("/v1/completions", json={"prompt": COMPLETIONS[0], "temperature": 0,
                                             "guided_choice": ["Paris", "Lyon"]})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("Paris", "Lyon"), r.text
    m = {s.name: s.value for fam in text_string_to_metric_families(client.get("/metrics").text) for s in fam.samples
         if set(s.labels) == {"model_name"}}
    assert m["ad_generation_tokens_total"] >= 1 and m["ad_time_to_first_token_seconds_count"] >= 1
    assert m["ad_num_requests_running"] == 0 and m["ad_num_requests_waiting"] == 0
    # Rank 0's pages after the request finished: the prefix cache keeps its prompt's pages, which count as free.
    assert 0.0 <= m["ad_kv_cache_usage_perc"] <= 1.0
