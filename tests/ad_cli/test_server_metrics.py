"""/metrics of a real server, scraped and parsed with prometheus-client's parser while requests run through `openai`."""

import time
from typing import Any

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("prometheus_client")
import httpx  # noqa: E402 - after the skips
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


def _scrape(url: str) -> dict[tuple, float]:
    """Samples by (name, labels other than model_name); /metrics needs no API key."""
    r = httpx.get(f"{url}/metrics", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            assert s.labels.get("model_name") == "smollm2-2-layers", s
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return out


def _delta(before: dict, after: dict, name: str, *labels: tuple[str, str]) -> float:
    key = (name, tuple(sorted(labels)))
    return after[key] - before.get(key, 0.0)


@pytest.fixture(scope="module")
def client(shared_server: Any) -> Any:
    with openai.OpenAI(api_key=shared_server.key, base_url=f"{shared_server.url}/v1", max_retries=0,
                       timeout=300) as c:
        yield c


def test_metrics_move_as_requests_run(client: Any, shared_server: Any) -> None:
    url = shared_server.url
    before = _scrape(url)
    for name in ("ad_num_requests_running", "ad_num_requests_waiting", "ad_kv_cache_usage_perc",
                 "ad_prefix_cache_hit_rate", "ad_num_preemptions_total", "ad_prefix_cache_queries_total",
                 "ad_prefix_cache_hits_total"):
        assert (name, ()) in before, name
    plain = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": PROMPT}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    chat_prompt = chunks[-1].usage.prompt_tokens
    after = _scrape(url)
    assert _delta(before, after, "ad_prompt_tokens_total") == plain.usage.prompt_tokens + chat_prompt
    assert _delta(before, after, "ad_generation_tokens_total") == 5 + 6
    assert _delta(before, after, "ad_request_success_total", ("finished_reason", "length")) == 2
    for hist in ("ad_time_to_first_token_seconds", "ad_e2e_request_latency_seconds",
                 "ad_time_per_output_token_seconds"):
        assert _delta(before, after, f"{hist}_count") == 2, hist
        assert _delta(before, after, f"{hist}_sum") > 0, hist
        assert after[(f"{hist}_bucket", (("le", "+Inf"),))] == after[(f"{hist}_count", ())]
    # Seen after every step, streamed or not: 5 tokens have 4 gaps, 6 have 5.
    assert _delta(before, after, "ad_inter_token_latency_seconds_count") == 4 + 5
    assert _delta(before, after, "ad_prefix_cache_queries_total") == plain.usage.prompt_tokens + chat_prompt
    assert after[("ad_num_requests_running", ())] == 0 and after[("ad_kv_cache_usage_perc", ())] == 0


def test_running_request_and_kv_cache_show_then_an_abort_counts(client: Any, shared_server: Any) -> None:
    url = shared_server.url
    before = _scrape(url)
    stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=200, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # the request has its first token and 199 to go
    during = _scrape(url)
    stream.close()
    assert during[("ad_num_requests_running", ())] == 1
    assert 0 < during[("ad_kv_cache_usage_perc", ())] < 1
    assert _delta(before, during, "ad_generation_tokens_total") >= 1
    # The server sees the closed stream at its next write, then the engine thread drops the request.
    deadline = time.monotonic() + 120
    while True:
        after = _scrape(url)
        aborted = _delta(before, after, "ad_request_failure_total", ("reason", "abort"))
        if (aborted, after[("ad_num_requests_running", ())]) == (1, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert aborted == 1 and after[("ad_num_requests_running", ())] == 0, after


def test_metrics_need_no_api_key_but_v1_does(shared_server: Any) -> None:
    assert httpx.get(f"{shared_server.url}/metrics").status_code == 200
    assert httpx.get(f"{shared_server.url}/v1/models").status_code == 401
