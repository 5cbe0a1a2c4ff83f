"""``GET /metrics``: the endpoint's Prometheus metrics (the ``prometheus_client`` library).

Per app (its own registry, so several apps in one process do not collide):

* ``skyrl_http_requests_total{endpoint, status}``: every request, the guards' refusals included;
* ``skyrl_http_request_duration_seconds{endpoint}``: from the request to the last byte of the reply;
* ``skyrl_http_requests_in_progress``: requests being served now;
* ``skyrl_prompt_tokens_total`` / ``skyrl_generation_tokens_total{endpoint}``;
* ``skyrl_time_to_first_token_seconds`` and ``skyrl_time_per_output_token_seconds`` (streams);
* read from the engines at scrape time: ``skyrl_engine_sequences_in_flight{engine}`` (the queue
  depth each engine has from this client), ``skyrl_engine_healthy{engine}``,
  ``skyrl_engine_asleep{engine}`` and ``skyrl_weight_version{engine}``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Endpoints with their own label; anything else (unknown paths, probes) is counted as "other".
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
             "/metrics")


class _EngineCollector(Collector):
    """Engine gauges, read from the client when Prometheus scrapes (never stale)."""

    def __init__(self, client: Any, states: Any) -> None:
        self.client = client
        self.states = states  # engine id -> the last state read by the /metrics route

    def collect(self) -> Iterator[GaugeMetricFamily]:
        inflight = GaugeMetricFamily("skyrl_engine_sequences_in_flight",
                                     "Sequences this server's client has in flight on each engine", labels=["engine"])
        healthy = GaugeMetricFamily("skyrl_engine_healthy", "1 when the engine is in rotation", labels=["engine"])
        asleep = GaugeMetricFamily("skyrl_engine_asleep", "1 while the engine sleeps", labels=["engine"])
        version = GaugeMetricFamily("skyrl_weight_version", "Weight version of each engine", labels=["engine"])
        health = self.client.health() if hasattr(self.client, "health") else {}
        for engine_id, info in health.items():
            inflight.add_metric([engine_id], float(info.get("inflight", 0)))
            healthy.add_metric([engine_id], 1.0 if info.get("healthy") else 0.0)
            state = self.states.get(engine_id, {})
            asleep.add_metric([engine_id], 1.0 if state.get("asleep") else 0.0)
            if state.get("weight_version") is not None:
                version.add_metric([engine_id], float(state["weight_version"]))
        yield from (inflight, healthy, asleep, version)


class ServerMetrics:
    """The app's metrics; ``asgi(app)`` counts every request that reaches the server."""

    def __init__(self, client: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("skyrl_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.duration = Histogram("skyrl_http_request_duration_seconds", "Time from request to the reply's last byte",
                                  ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge("skyrl_http_requests_in_progress", "Requests being served", registry=r)
        self.prompt_tokens = Counter("skyrl_prompt_tokens", "Prompt tokens processed", ["endpoint"], registry=r)
        self.generation_tokens = Counter("skyrl_generation_tokens", "Tokens generated", ["endpoint"], registry=r)
        self.first_token = Histogram("skyrl_time_to_first_token_seconds", "Streams: time to the first token",
                                     ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("skyrl_time_per_output_token_seconds",
                                   "Streams: time between tokens after the first",
                                   ["endpoint"], buckets=_TOKEN_BUCKETS, registry=r)
        self.engine_states: dict[str, dict[str, Any]] = {}
        r.register(_EngineCollector(client, self.engine_states))
        # Labelled children, resolved once: ``labels()`` takes a lock and builds a key every call.
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def count_tokens(self, endpoint: str, prompt_tokens: int, generated_tokens: int) -> None:
        self._child(self.prompt_tokens, endpoint).inc(prompt_tokens)
        self._child(self.generation_tokens, endpoint).inc(generated_tokens)

    def observe_stream(self, endpoint: str, started: float, first_token_at: float | None, tokens: int) -> None:
        if first_token_at is None:
            return
        self._child(self.first_token, endpoint).observe(first_token_at - started)
        if tokens > 1:
            self._child(self.per_token, endpoint).observe((time.perf_counter() - first_token_at) / (tokens - 1))

    def asgi(self, app: Any) -> Any:
        """``app`` with every HTTP request counted and timed (status from the reply's start)."""

        async def observed(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            status = 500
            started = time.perf_counter()

            async def send_observed(message: dict[str, Any]) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            self.in_progress.inc()
            try:
                await app(scope, receive, send_observed)
            finally:
                self.in_progress.dec()
                self._child(self.requests, endpoint, str(status)).inc()
                self._child(self.duration, endpoint).observe(time.perf_counter() - started)

        return observed
