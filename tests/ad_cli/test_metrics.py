"""ServerMetrics on its own: each request's Updates become exact observations, parsed back from the text format."""

import pytest

pytest.importorskip("prometheus_client")
from ad_cli.engine_thread import Update, failed_update  # noqa: E402
from ad_cli.metrics import ServerMetrics  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def _samples(m: ServerMetrics) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return out


def _upd(n: int, made_at: float, finished: bool = False, **kw) -> Update:
    times = {"arrival_time": 10.0, "first_token_time": 10.5}
    return Update(list(range(n)), "", finished, "length" if finished else None, made_at=made_at, **{**times, **kw})


def test_a_streamed_request_gives_ttft_itl_tpot_e2e_and_token_counts():
    m = ServerMetrics("m", running=lambda: 3, waiting=lambda: 2, kv_cache_usage=lambda: 0.25)
    t = m.track(prompt_tokens=7)
    t.update(_upd(1, made_at=100.0))
    t.update(_upd(2, made_at=100.1))
    t.update(_upd(5, made_at=100.7))  # three tokens in one update: three gaps of 0.2 s
    t.update(_upd(5, made_at=100.8, finished=True, finish_time=11.3, num_preemptions=2, num_cached_tokens=4))
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


def test_a_plain_request_counts_once_and_aborts_and_errors_are_failures():
    m = ServerMetrics("m", running=lambda: 0, waiting=lambda: 0)  # no KV-cache view (several ranks)
    t = m.track(prompt_tokens=3)
    t.update(_upd(4, made_at=5.0, finished=True, finish_time=12.0))
    t.update(_upd(4, made_at=6.0, finished=True, finish_time=12.0))  # after the end: ignored
    t.aborted()
    gone = m.track(prompt_tokens=3)
    gone.aborted()
    gone.aborted()
    m.track(prompt_tokens=3).update(failed_update("the engine stopped"))
    s = _samples(m)
    assert not any(name == "ad_kv_cache_usage_perc" for name, _ in s)
    assert s[("ad_generation_tokens_total", ())] == 4 and s[("ad_prompt_tokens_total", ())] == 3
    assert s[("ad_inter_token_latency_seconds_count", ())] == 0, "one update: no gap seen"
    assert s[("ad_time_per_output_token_seconds_sum", ())] == pytest.approx(1.5 / 3)
    assert s[("ad_request_success_total", (("finished_reason", "length"),))] == 1
    assert s[("ad_request_failure_total", (("reason", "abort"),))] == 1
    assert s[("ad_request_failure_total", (("reason", "error"),))] == 1
    assert s[("ad_prefix_cache_hit_rate", ())] == 0


def test_two_apps_in_one_process_keep_their_own_metrics():
    a, b = ServerMetrics("a", lambda: 0, lambda: 0), ServerMetrics("b", lambda: 0, lambda: 0)
    a.track(2).update(_upd(1, made_at=1.0, finished=True, finish_time=11.0))
    assert _samples(a)[("ad_generation_tokens_total", ())] == 1
    assert _samples(b)[("ad_generation_tokens_total", ())] == 0, "every series exists from the start, at 0"
