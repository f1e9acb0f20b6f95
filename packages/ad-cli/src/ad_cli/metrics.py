"""The server's Prometheus metrics: load, tokens, latencies, KV-cache use, preemptions, outcomes, prefix-cache hits.

Most values come from what the HTTP layer sees of each request (its Updates carry the engine's times and counts),
so they are the same with one process or several ranks. The engine's own state (requests running, KV-cache use) is
read at scrape time from whatever the engine wrapper offers; a multi-rank server's engine lives in rank 0's
process, so there running is estimated from the requests in flight and KV-cache use is not exported.
"""

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .engine_thread import Update

PREFIX = "ad_"
# Seconds; from a few milliseconds (a GPU decode step) to minutes (a long answer on a CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The metrics of one app, in a registry of its own (several apps may live in one process, as in tests)."""

    def __init__(self, model_name: str, running: Callable[[], float], waiting: Callable[[], float],
                 kv_cache_usage: Callable[[], float] | None = None):
        self.registry = CollectorRegistry()
        reg, label = self.registry, ["model_name"]

        def gauge(name: str, doc: str, fn: Callable[[], float]) -> None:
            Gauge(PREFIX + name, doc, label, registry=reg).labels(model_name).set_function(fn)

        # Every series exists from the first scrape, at 0 (a series that appears later breaks rate()).
        def counter(name: str, doc: str) -> Any:
            return Counter(PREFIX + name, doc, label, registry=reg).labels(model_name)

        def by_reason(name: str, doc: str, key: str, reasons: tuple[str, ...]) -> Counter:
            family = Counter(PREFIX + name, doc, [*label, key], registry=reg)
            for reason in reasons:
                family.labels(model_name, reason)
            return family

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(PREFIX + name, doc, label, buckets=buckets, registry=reg).labels(model_name)

        gauge("num_requests_running", "Requests the engine runs now.", running)
        gauge("num_requests_waiting", "Requests admitted and waiting to run.", waiting)
        if kv_cache_usage is not None:
            gauge("kv_cache_usage_perc", "Share of KV-cache pages in use (1 = all).", kv_cache_usage)
        gauge("prefix_cache_hit_rate", "Share of prompt tokens of finished requests that the prefix cache supplied.",
              self._hit_rate)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that started answering.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.preemptions = counter("num_preemptions", "Times a finished request was preempted (recomputed later).")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens of finished requests (cache lookups).")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens of finished requests found in the prefix cache.")
        self.success = by_reason("request_success", "Requests that ended with an answer, by finish reason.",
                                 "finished_reason", ("stop", "length"))
        self.failure = by_reason("request_failure", "Requests that ended without an answer: error or abort "
                                 "(the client went away).", "reason", ("error", "abort"))
        self.ttft = histogram("time_to_first_token_seconds", "From the engine's arrival to the first token.",
                              TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Per request: (last token - first token) / "
                              "(tokens - 1).", TOKEN_GAP_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Gaps between tokens of streamed requests (a gap of "
                             "several tokens counts once per token).", TOKEN_GAP_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "From the engine's arrival to the last token.",
                             E2E_BUCKETS)
        self.model_name = model_name
        self._queries = 0
        self._hits = 0

    def _hit_rate(self) -> float:
        return self._hits / self._queries if self._queries else 0.0

    def render(self) -> bytes:
        """The text exposition format; gauges read the engine now."""
        return generate_latest(self.registry)

    def track(self, prompt_tokens: int) -> "RequestTracker":
        """A tracker for one request admitted with `prompt_tokens` prompt tokens."""
        return RequestTracker(self, prompt_tokens)


class RequestTracker:
    """Turns one request's Updates into metric observations; ends once (finished, failed or aborted)."""

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int):
        self.m = metrics
        self.prompt_tokens = prompt_tokens
        self.tokens = 0  # output tokens counted so far
        self.last_made_at: float | None = None
        self.done = False

    def update(self, upd: Update) -> None:
        """Count what `upd` adds; a streamed request's updates come one per step, a plain request's only last."""
        if self.done:
            return
        m = self.m
        new = len(upd.token_ids) - self.tokens
        if new > 0:
            if self.tokens == 0:
                m.prompt_tokens.inc(self.prompt_tokens)
                if upd.first_token_time is not None and upd.arrival_time is not None:
                    m.ttft.observe(max(0.0, upd.first_token_time - upd.arrival_time))
            elif self.last_made_at is not None:
                gap = max(0.0, upd.made_at - self.last_made_at) / new
                for _ in range(new):
                    m.itl.observe(gap)
            m.generation_tokens.inc(new)
            self.tokens = len(upd.token_ids)
            self.last_made_at = upd.made_at
        if upd.finished:
            self._finish(upd)

    def aborted(self) -> None:
        """The client went away before the last update."""
        if not self.done:
            self.done = True
            self.m.failure.labels(self.m.model_name, "abort").inc()

    def _finish(self, upd: Update) -> None:
        self.done = True
        m, name = self.m, self.m.model_name
        if upd.num_preemptions:
            m.preemptions.inc(upd.num_preemptions)
        if upd.error:
            m.failure.labels(name, "error").inc()
            return
        m.success.labels(name, upd.finish_reason or "unknown").inc()
        if upd.finish_time is not None and upd.arrival_time is not None:
            m.e2e.observe(max(0.0, upd.finish_time - upd.arrival_time))
        if self.tokens >= 2 and upd.finish_time is not None and upd.first_token_time is not None:
            m.tpot.observe(max(0.0, upd.finish_time - upd.first_token_time) / (self.tokens - 1))
        m.prefix_queries.inc(self.prompt_tokens)
        m.prefix_hits.inc(min(upd.num_cached_tokens, self.prompt_tokens))
        m._queries += self.prompt_tokens
        m._hits += min(upd.num_cached_tokens, self.prompt_tokens)
