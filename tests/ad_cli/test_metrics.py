"""ServerMetrics on its own: what trackers see of engine requests becomes exact observations, parsed back as text."""

from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client")
from ad_cli.metrics import ServerMetrics  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _samples(m: ServerMetrics) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return out


def _req(n: int, finished: bool = False, **kw) -> SimpleNamespace:
    """An engine Request as trackers read it: output ids, whether it ended and why, the engine's times."""
    fields = {"output_token_ids": list(range(n)), "is_finished": finished, "finish_reason": "length" if finished
              else None, "error": None, "arrival_time": 10.0, "first_token_time": 10.5, "finish_time": None,
              "num_preemptions": 0}
    return SimpleNamespace(**{**fields, **kw})


def test_a_request_seen_every_step_gives_ttft_itl_tpot_e2e_and_token_counts():
    clock = Clock()
    m = ServerMetrics("m", running=lambda: 3, waiting=lambda: 2, kv_cache_usage=lambda: 0.25, clock=clock)
    t = m.track(prompt_tokens=7)
    t.update(_req(0))  # prefill not done: nothing yet
    t.update(_req(1))
    clock.t = 100.1
    t.update(_req(2))
    clock.t = 100.7
    t.update(_req(5))  # three tokens in one update: three gaps of 0.2 s
    t.update(_req(5, finished=True, finish_time=11.3, num_preemptions=2, num_cached_tokens=4))
    s = _samples(m)
    assert s[("ad_num_requests_running", ())] == 3 and s[("ad_num_requests_waiting", ())] == 2
    assert s[("ad_kv_cache_usage_perc", ())] == 0.25
    assert s[("ad_prompt_tokens_total", ())] == 7 and s[("ad_generation_tokens_total", ())] == 5
    assert s[("ad_time_to_first_token_seconds_count", ())] == 1
    assert s[("ad_time_to_first_token_seconds_sum", ())] == pytest.approx(0.5)
    assert s[("ad_inter_token_latency_seconds_count", ())] == 4
    assert s[("ad_inter_token_latency_seconds_sum", ())] == pytest.approx(0.1 + 3 * 0.2)
    assert s[("ad_time_per_output_token_seconds_sum", ())] == pytest.approx(0.8 / 4)
    assert s[("ad_e2e_request_latency_seconds_sum", ())] == pytest.approx(1.3)
    assert s[("ad_request_success_total", (("finished_reason", "length"),))] == 1
    assert s[("ad_num_preemptions_total", ())] == 2
    assert s[("ad_prefix_cache_queries_total", ())] == 7 and s[("ad_prefix_cache_hits_total", ())] == 4
    assert s[("ad_prefix_cache_hit_rate", ())] == pytest.approx(4 / 7)


def test_a_request_seen_only_at_its_end_counts_once_and_aborts_and_errors_are_failures():
    m = ServerMetrics("m", running=lambda: 0, waiting=lambda: 0)  # no KV-cache view (several ranks)
    t = m.track(prompt_tokens=3)
    done = _req(4, finished=True, finish_time=12.0)
    t.update(done)
    t.update(done)  # after the end: ignored
    t.aborted()
    gone = m.track(prompt_tokens=3)
    gone.update(_req(2))
    gone.aborted()
    gone.aborted()
    gone.update(_req(3, finished=True, finish_time=12.0, finish_reason="error", error="aborted"))
    m.track(prompt_tokens=3).update(_req(0, finished=True, finish_reason="error", error="the prompt is empty"))
    m.track(prompt_tokens=3).failed()
    s = _samples(m)
    assert not any(name == "ad_kv_cache_usage_perc" for name, _ in s)
    assert s[("ad_generation_tokens_total", ())] == 4 + 2 and s[("ad_prompt_tokens_total", ())] == 3 + 3
    assert s[("ad_inter_token_latency_seconds_count", ())] == 0, "one sighting each: no gap seen"
    assert s[("ad_time_per_output_token_seconds_sum", ())] == pytest.approx(1.5 / 3)
    assert s[("ad_request_success_total", (("finished_reason", "length"),))] == 1
    assert s[("ad_request_success_total", (("finished_reason", "stop"),))] == 0
    assert s[("ad_request_failure_total", (("reason", "abort"),))] == 1
    assert s[("ad_request_failure_total", (("reason", "error"),))] == 2
    assert s[("ad_prefix_cache_hit_rate", ())] == 0, "requests without num_cached_tokens: no hits"


def test_two_apps_in_one_process_keep_their_own_metrics():
    a, b = ServerMetrics("a", lambda: 0, lambda: 0), ServerMetrics("b", lambda: 0, lambda: 0)
    a.track(2).update(_req(1, finished=True, finish_time=11.0))
    assert _samples(a)[("ad_generation_tokens_total", ())] == 1
    assert _samples(b)[("ad_generation_tokens_total", ())] == 0, "every series exists from the start, at 0"
