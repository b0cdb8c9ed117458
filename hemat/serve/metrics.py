"""Prometheus metrics for one server, in the app's own CollectorRegistry (several apps in one process,
as in tests, must not clash). Engine state (queue, cache pages, cancellations) is read from
`engine.stats()` at scrape time, so it is never stale."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("hemat.serve")

# seconds: CPU decode is milliseconds per token, a cold prompt on a big model seconds
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("hemat_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.stream_errors = Counter("hemat_stream_errors", "streams that ended with an error event", registry=r)
        self.cancelled = Counter("hemat_requests_cancelled", "generations cancelled (client gone or shutdown)",
                                 registry=r)
        self.prompt_tokens = Counter("hemat_prompt_tokens", "prompt tokens processed", registry=r)
        self.cached_tokens = Counter("hemat_prompt_cached_tokens", "prompt tokens served from the prefix cache",
                                     registry=r)
        self.completion_tokens = Counter("hemat_completion_tokens", "tokens generated", registry=r)
        self.cost_usd = Counter("hemat_cost_usd", "US dollars billed at the configured prices", registry=r)
        self.ttft = Histogram("hemat_time_to_first_token_seconds", "time from admission to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram("hemat_time_per_output_token_seconds",
                                   "mean time between tokens after the first, per request", buckets=TOKEN_BUCKETS,
                                   registry=r)
        self.queue_depth = Gauge("hemat_queue_depth", "requests waiting for admission", registry=r)
        self.running = Gauge("hemat_requests_running", "requests admitted and generating", registry=r)
        r.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounterMiddleware:
    """Counts every HTTP response by route and status; unknown paths count as route "other" so that
    probing random URLs cannot grow the label set without bound."""

    def __init__(self, app, metrics: ServerMetrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # if the app dies before answering

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.requests.labels(route=route, status=str(status)).inc()


class _EngineCollector:
    """Every numeric entry of engine.stats() as a gauge `hemat_engine_<name>`, plus the cache use ratio."""

    def __init__(self, engine_stats: Callable[[], dict]):
        self.engine_stats = engine_stats

    def describe(self):
        return []  # names depend on the engine's stats; nothing to check at registration

    def collect(self):
        try:
            stats = self.engine_stats()
        except Exception:  # a scrape must not fail because the engine is mid-shutdown
            log.exception("engine.stats() failed")
            return
        for key, value in stats.items():
            if isinstance(value, (int, float)):
                name = "hemat_engine_" + re.sub(r"[^a-zA-Z0-9_]+", "_", str(key)).strip("_").lower()
                yield GaugeMetricFamily(name, f"engine.stats()[{key!r}]", value=float(value))
        if isinstance(stats.get("weight_format"), str):
            info = GaugeMetricFamily("hemat_engine_weight_format", "the served weights' format (value 1)",
                                     labels=["format"])
            info.add_metric([stats["weight_format"]], 1.0)
            yield info
        total, free = stats.get("pages_total"), stats.get("pages_free")
        if isinstance(total, (int, float)) and isinstance(free, (int, float)) and total > 0:
            yield GaugeMetricFamily("hemat_cache_usage_ratio", "fraction of KV cache pages in use",
                                    value=1.0 - free / total)
