"""The gateway's Prometheus metrics (``GET /metrics``), through ``prometheus-client``.

Names follow the OpenTelemetry GenAI and HTTP semantic conventions where they exist
(``gen_ai.client.operation.duration`` -> ``gen_ai_client_operation_duration_seconds``,
...), then the gateway's own under ``gateway_``. :class:`Metrics` is made once per app
(``app.py``) and fed by :meth:`Metrics.observe`, an observer of each request's
``Record`` (``record.py``).

Labels are bounded by construction: a model or provider label takes only a name the
config or discovery knows (anything else is ``other``), a gateway key only its
configured name; never a request id or anything else the client chose.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric

from proxy.record import Record

# Seconds, from a cached answer's milliseconds to a reasoning model's minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60,
                    120, 240, 480, 900)
# The gateway's own time per request: from 100 us.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1, 0.25, 1)
# Tokens per answer (OpenTelemetry's advice for gen_ai.client.token.usage).
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576,
                 4194304, 16777216, 67108864)

OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion",
              "/v1/embeddings": "embeddings", "/v1/responses": "chat"}


class Metrics:
    """Every metric of one gateway app, in ``registry`` (a fresh one per app, so two
    gateways in one process, as in the tests, never mix their figures)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry = registry or CollectorRegistry(auto_describe=True)
        model = ("gen_ai_operation_name", "gen_ai_request_model", "gen_ai_provider_name")
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration, request to last byte.", (*model, "error_type"),
            buckets=DURATION_BUCKETS, registry=registry)
        self.time_to_first_chunk = Histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time to the answer's first byte (a stream's first chunk).", model,
            buckets=DURATION_BUCKETS, registry=registry)
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Tokens used per answer.",
            (*model, "gen_ai_token_type"), buckets=TOKEN_BUCKETS, registry=registry)
        self.http_duration = Histogram(
            "http_server_request_duration_seconds", "Duration of HTTP server requests.",
            ("http_request_method", "http_route", "http_response_status_code"),
            buckets=DURATION_BUCKETS, registry=registry)
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "The gateway's own time per request (X-Gateway-Overhead-Ms).",
            buckets=OVERHEAD_BUCKETS, registry=registry)
        self.requests = Counter(
            "gateway_requests", "Requests by route, model, provider and status.",
            ("route", "model", "provider", "status"), registry=registry)
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests being served.",
                               registry=registry, multiprocess_mode="livesum")
        self.stream_endings = Counter(
            "gateway_stream_endings", "Streams by how they ended.", ("reason",),
            registry=registry)
        self.cache = Counter("gateway_cache_lookups", "Response cache lookups.",
                             ("result",), registry=registry)
        self.dedup = Counter("gateway_dedup_requests", "Shared requests by role.",
                             ("role",), registry=registry)

    def observe(self, record: Record) -> None:
        """The observer (``record.Observer``): one ended request."""
        status = str(record.status)
        provider = record.provider or "none"
        model = record.model or "none"
        duration = record.duration()
        self.requests.labels(record.path, model, provider, status).inc()
        self.http_duration.labels(record.method, record.path, status).observe(duration)
        self.overhead.observe(max(record.overhead_ms(), 0.0) / 1000)
        operation = OPERATIONS.get(record.path)
        if operation is not None:
            error = "" if record.status < 400 else status
            self.operation_duration.labels(operation, model, provider, error).observe(
                duration)
            first = record.time_to_first_byte()
            if first is not None and record.status < 400:
                self.time_to_first_chunk.labels(operation, model, provider).observe(first)
        if record.stream:
            self.stream_endings.labels(record.ended).inc()
        if record.cache is not None:
            self.cache.labels(record.cache).inc()
        if record.dedup is not None:
            self.dedup.labels(record.dedup).inc()

    def collect(self) -> Iterable[Metric]:
        """Every metric family with its samples (the status page reads these)."""
        return self.registry.collect()

    def exposition(self) -> bytes:
        """The text format a Prometheus scrape gets."""
        return generate_latest(self.registry)
