"""Prometheus metrics of one app instance, served by `GET /metrics`.

Each app gets its own `CollectorRegistry` (not the process-global one), so several apps in one
process, as in the tests, never clash or share counts.

Metric names are a stable interface (the pipeline's tests and dashboards read them):

- `whisper_requests_total{route,status}`: every HTTP request; `route` is the route
  template (`/transcribe`, `/v1/audio/transcriptions`, `/healthz`, `/metrics`) or `unmatched`.
- `whisper_transcriptions_total{route}`: clips transcribed successfully (one per 200 answer
  of `/transcribe` or `/v1/audio/transcriptions`). Count requests the pipeline made with this.
- `whisper_errors_total{reason}`: refused or failed requests; `reason` is one of `ERROR_REASONS`.
- `whisper_audio_seconds_total`: seconds of audio transcribed.
- `whisper_batch_size`: histogram of clips per engine call (>1 means batching happened).
- `whisper_batch_duration_seconds`: histogram of engine call wall time.
- `whisper_request_duration_seconds{route}`: histogram of HTTP request wall time.
- `whisper_model_loaded`: 1 once the model is loaded and /healthz answers 200, else 0.
- `whisper_queue_depth{lane}`: clips waiting in each batcher lane (`short`, `long`), read at
  scrape time; the batch being transcribed is not counted.
- `whisper_rejected_total{lane}`: requests refused with 429 because the lane's queue was full.
- `whisper_abandoned_total{reason}`: queued requests dropped before their engine call because
  nobody waits for the answer: `disconnected` (the client closed the connection) or
  `cancelled` (the handler was cancelled).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ERROR_REASONS: Final = (
    "empty_upload",  # 0-byte file
    "not_audio",  # soundfile cannot decode it (wrong format, truncated, corrupt)
    "too_large",  # over max_upload_bytes
    "invalid_request",  # missing/invalid form fields, unsupported language or format
    "unauthorized",  # missing or wrong bearer token
    "not_ready",  # model still loading, or failed to load
    "engine_error",  # the engine raised: a server-side failure (500)
    "overloaded",  # the batcher's queue was full (429 with Retry-After)
    "client_gone",  # the client disconnected before its clip reached the engine (499)
)
LANES: Final = ("short", "long")
ABANDON_REASONS: Final = ("disconnected", "cancelled")
BATCH_BUCKETS: Final = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
METRICS_PATH: Final = "/metrics"  # routes.py serves it; its own scrape is not "in progress"


class ServiceMetrics:
    """All metrics of one app, registered on a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "whisper_requests", "HTTP requests by route and status.", ["route", "status"],
            registry=r,
        )
        self.transcriptions = Counter(
            "whisper_transcriptions", "Clips transcribed successfully.", ["route"], registry=r
        )
        self.errors = Counter(
            "whisper_errors", "Refused or failed requests.", ["reason"], registry=r
        )
        self.audio_seconds = Counter(
            "whisper_audio_seconds", "Seconds of audio transcribed.", registry=r
        )
        self.batch_size = Histogram(
            "whisper_batch_size", "Clips per engine call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_duration = Histogram(
            "whisper_batch_duration_seconds",
            "Engine call wall time.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.latency = Histogram(
            "whisper_request_duration_seconds",
            "HTTP request wall time.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_loaded = Gauge("whisper_model_loaded", "1 once the model is loaded.", registry=r)
        self.in_progress = Gauge(
            "whisper_requests_in_progress",
            "HTTP requests received and not yet answered (queued, in the engine or being sent); "
            "a scrape of /metrics does not count itself.",
            registry=r,
        )
        self.queue_depth = Gauge(
            "whisper_queue_depth", "Clips waiting per batcher lane.", ["lane"], registry=r
        )
        self.rejected_requests = Counter(
            "whisper_rejected", "Requests refused with 429: queue full.", ["lane"], registry=r
        )
        self.abandoned_requests = Counter(
            "whisper_abandoned", "Queued requests dropped before the engine: nobody waits.",
            ["reason"], registry=r,
        )
        for lane in LANES:
            self.queue_depth.labels(lane=lane)
            self.rejected_requests.labels(lane=lane)
        for why in ABANDON_REASONS:
            self.abandoned_requests.labels(reason=why)
        for reason in ERROR_REASONS:  # export zeros so rate() works before the first error
            self.errors.labels(reason=reason)

    def error(self, reason: str) -> None:
        if reason not in ERROR_REASONS:
            raise ValueError(f"unknown error reason {reason!r}")
        self.errors.labels(reason=reason).inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_duration.observe(seconds)

    def rejected(self, lane: str) -> None:
        self.rejected_requests.labels(lane=lane).inc()

    def abandoned(self, reason: str) -> None:
        self.abandoned_requests.labels(reason=reason).inc()

    def track_queues(self, depth: Callable[[str], int]) -> None:
        """Read each lane's depth from `depth(lane)` whenever /metrics is scraped."""
        for lane in LANES:
            self.queue_depth.labels(lane=lane).set_function(lambda lane=lane: depth(lane))

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type, negotiated from the Accept header."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class MetricsMiddleware:
    """Counts and times every HTTP request, including those refused before routing."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths  # the app's route templates, for requests refused before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before answering
        start = time.perf_counter()
        counted = scope["path"] != METRICS_PATH
        if counted:
            self.metrics.in_progress.inc()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            if counted:
                self.metrics.in_progress.dec()
            route = route_label(scope, self.paths)
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(time.perf_counter() - start)


def route_label(scope: Scope, paths: frozenset[str]) -> str:
    """The matched route's template, never a raw unknown path (that would explode cardinality)."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    return scope["path"] if scope["path"] in paths else "unmatched"
