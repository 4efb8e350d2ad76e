"""Prometheus metrics of one server, in a registry of its own (never the global default one, so
several servers in one process, as in tests, do not share or clash)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from moelab.infer.engine import EngineStats

CONTENT_TYPE = CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0)


class ServerMetrics:
    """Requests, tokens in and out, queue depth and latency histograms. `stats` returns the
    engine's current numbers, or None while there is no engine (the model is loading)."""

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moelab_requests", "HTTP requests answered, by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.request_latency = Histogram(
            "moelab_request_latency_seconds",
            "Time from request to the last byte of the response",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "moelab_prompt_tokens", "Prompt tokens of accepted generation requests", registry=r
        )
        self.generation_tokens = Counter("moelab_generation_tokens", "Tokens generated", registry=r)
        self.cancelled = Counter(
            "moelab_cancelled_requests", "Generation requests whose client left before the end", registry=r
        )
        self.rejected = Counter(
            "moelab_rejected_requests", "Generation requests refused because the queue was full", registry=r
        )
        self.time_to_first_token = Histogram(
            "moelab_time_to_first_token_seconds",
            "Time from request to its first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "moelab_time_per_output_token_seconds",
            "Time between consecutive tokens of one choice",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "moelab_queue_time_seconds", "Time a request waited for cache rows", buckets=LATENCY_BUCKETS, registry=r
        )
        queue_depth = Gauge("moelab_queue_depth", "Requests waiting for cache rows", registry=r)
        running = Gauge("moelab_running_sequences", "Sequences being generated (cache rows in use)", registry=r)
        running_requests = Gauge("moelab_running_requests", "Requests being generated", registry=r)
        loaded = Gauge("moelab_model_loaded", "1 once the model is loaded and serving", registry=r)
        queue_depth.set_function(lambda: _field(stats, "waiting_requests"))
        running.set_function(lambda: _field(stats, "running_sequences"))
        running_requests.set_function(lambda: _field(stats, "running_requests"))
        loaded.set_function(lambda: float(stats() is not None))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _field(stats: Callable[[], EngineStats | None], name: str) -> float:
    current = stats()
    return float(getattr(current, name)) if current is not None else 0.0
