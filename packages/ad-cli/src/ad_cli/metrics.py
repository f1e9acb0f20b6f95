"""The server's Prometheus metrics: load, tokens, latencies, KV-cache use, preemptions, outcomes, prefix-cache hits.

Per-request values come from the engine wrapper, which hands each engine request it sees change (with the engine's
times and counts) to that request's RequestTracker: after every step with one process (EngineThread), after every
step of a streamed request and at the end of any other with several ranks (DistributedEngine, whose engine lives in
rank 0's process). The engine's state (requests running, KV-cache use) is read at scrape time where the wrapper
offers it; over several ranks, running is estimated from the requests in flight and KV-cache use is not exported.
"""

import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "ad_"
# Seconds; from a few milliseconds (a GPU decode step) to minutes (a long answer on a CPU).
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """The metrics of one app, in a registry of its own (several apps may live in one process, as in tests)."""

    def __init__(self, model_name: str, running: Callable[[], float], waiting: Callable[[], float],
                 kv_cache_usage: Callable[[], float] | None = None, clock: Callable[[], float] = time.perf_counter):
        self.model_name = model_name
        self.clock = clock  # when the server sees a token (gaps between a request's tokens)
        self._queries = 0  # prompt tokens of finished requests, and how many of them the prefix cache held
        self._hits = 0
        self._prefix_lock = threading.Lock()
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
        self.itl = histogram("inter_token_latency_seconds", "Gaps between a request's tokens as the server sees them "
                             "(a gap of k tokens counts k times, each 1/k of it); over several ranks, streamed "
                             "requests only.", TOKEN_GAP_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "From the engine's arrival to the last token.",
                             E2E_BUCKETS)

    def _hit_rate(self) -> float:
        return self._hits / self._queries if self._queries else 0.0

    def count_prefix(self, queries: int, hits: int) -> None:
        with self._prefix_lock:
            self._queries += queries
            self._hits += hits

    def render(self) -> bytes:
        """The text exposition format; gauges read the engine now."""
        return generate_latest(self.registry)

    def track(self, prompt_tokens: int) -> "RequestTracker":
        """A tracker for one request admitted with `prompt_tokens` prompt tokens."""
        return RequestTracker(self, prompt_tokens)


class RequestTracker:
    """Turns one engine request's progress into observations; ends once (finished, failed or aborted).

    `update` takes the engine's Request (or the snapshot a multi-rank backend sends) whenever the engine wrapper
    sees it change; it may come from the engine's thread while `aborted` comes from the event loop, hence the lock.
    """

    def __init__(self, metrics: ServerMetrics, prompt_tokens: int):
        self.m = metrics
        self.prompt_tokens = prompt_tokens
        self.tokens = 0  # output tokens counted so far
        self.last_seen: float | None = None  # when the newest of them was seen
        self.done = False
        self._lock = threading.Lock()

    def update(self, req: Any) -> None:
        """Count what the request has added since the last call; after the end, nothing."""
        now = self.m.clock()
        with self._lock:
            if self.done:
                return
            m = self.m
            n = len(req.output_token_ids)
            new = n - self.tokens
            if new > 0:
                if self.tokens == 0:
                    m.prompt_tokens.inc(self.prompt_tokens)
                    if req.first_token_time is not None:
                        m.ttft.observe(max(0.0, req.first_token_time - req.arrival_time))
                elif self.last_seen is not None:
                    gap = (now - self.last_seen) / new
                    for _ in range(new):
                        m.itl.observe(gap)
                m.generation_tokens.inc(new)
                self.tokens, self.last_seen = n, now
            if req.is_finished:
                self._finish(req)

    def aborted(self) -> None:
        """The client went away before the end."""
        self._end("abort")

    def failed(self) -> None:
        """The server could not finish the request (its engine or ranks stopped)."""
        self._end("error")

    def _end(self, reason: str) -> None:
        with self._lock:
            if not self.done:
                self.done = True
                self.m.failure.labels(self.m.model_name, reason).inc()

    def _finish(self, req: Any) -> None:
        self.done = True
        m = self.m
        if req.num_preemptions:
            m.preemptions.inc(req.num_preemptions)
        if req.error:
            m.failure.labels(m.model_name, "error").inc()
            return
        m.success.labels(m.model_name, req.finish_reason or "unknown").inc()
        if req.finish_time is not None:
            m.e2e.observe(max(0.0, req.finish_time - req.arrival_time))
            if self.tokens >= 2 and req.first_token_time is not None:
                m.tpot.observe(max(0.0, req.finish_time - req.first_token_time) / (self.tokens - 1))
        # Read defensively: requests carry num_cached_tokens only where the engine has a prefix cache.
        hits = min(int(getattr(req, "num_cached_tokens", 0) or 0), self.prompt_tokens)
        m.prefix_queries.inc(self.prompt_tokens)
        m.prefix_hits.inc(hits)
        m.count_prefix(self.prompt_tokens, hits)
