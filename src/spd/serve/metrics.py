"""`/metrics`: what the service is doing, in the Prometheus text format (`prometheus-client`).

    spd_requests_total{route, status}      requests answered (413s of the body limit and 503s included)
    spd_request_seconds{route}             latency, arrival of the request to the end of the answer
    spd_model_seconds{stage}               time inside the model (encode / decode), per call
    spd_queue_depth{stage}                 requests running or waiting per stage (decode / model)
    spd_busy_refusals_total{stage}         requests answered 503 because that stage's queue was full
    spd_cache_bytes, spd_cache_entries, spd_cache_{hits,misses,evictions}_total

Each app has its own registry (several apps in one process, as in the tests, do not collide). Routes
outside the API are counted as "other", so a client probing random paths cannot grow the label set.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ROUTES = ("/", "/healthz", "/metrics", "/v1/info", "/v1/encode", "/v1/depth", "/docs", "/openapi.json")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    def __init__(self, cache, stages: dict) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("spd_requests", "Requests answered, by route and HTTP status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("spd_request_seconds", "Request latency in seconds, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.model_time = Histogram("spd_model_seconds", "Seconds inside the model per call, by stage", ["stage"],
                                    buckets=LATENCY_BUCKETS, registry=self.registry)
        depth = Gauge("spd_queue_depth", "Requests running or waiting, by stage", ["stage"], registry=self.registry)
        for name, stage in stages.items():
            depth.labels(name).set_function(lambda stage=stage: stage.active)
        self.registry.register(_CacheCollector(cache, stages))


class _CacheCollector:
    """Cache figures and 503 counts read at scrape time from the objects that keep them."""

    def __init__(self, cache, stages: dict) -> None:
        self.cache, self.stages = cache, stages

    def collect(self):
        stats = self.cache.stats()
        yield GaugeMetricFamily("spd_cache_bytes", "Bytes of encoded images held", value=stats["bytes"])
        yield GaugeMetricFamily("spd_cache_entries", "Encoded images held", value=stats["entries"])
        for name in ("hits", "misses", "evictions"):
            yield CounterMetricFamily(f"spd_cache_{name}", f"Cache {name} (image_id lookups / entries dropped for room)",
                                      value=stats[name])
        refused = CounterMetricFamily("spd_busy_refusals", "Requests answered 503: the stage's queue was full",
                                      labels=["stage"])
        for name, stage in self.stages.items():
            refused.add_metric([name], stage.refused)
        yield refused


class MetricsMiddleware:
    """ASGI middleware (outermost): counts every answer by route and status and times it."""

    def __init__(self, app, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        start = time.perf_counter()
        status = {"code": 500}  # what a client sees if the app fails before answering

        async def watched_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
