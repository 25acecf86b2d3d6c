"""The gateway's Prometheus metrics (``GET /metrics``), through ``prometheus-client``.

Names follow the OpenTelemetry GenAI and HTTP semantic conventions where they exist
(``gen_ai.client.operation.duration`` -> ``gen_ai_client_operation_duration_seconds``,
...), then the gateway's own under ``gateway_``. :class:`Metrics` is made once per app
(``app.py``) and fed by :meth:`Metrics.observe`, an observer of the requests'
``Record``s (``record.py``), told of them in batches (``observe/observers.py``). They are
counted into plain-Python accumulators handed to prometheus-client once a second and at each scrape
(``observe/metrics_pending.py``: a value write costs a lock, and a file write with
``--workers N``); the per-provider state gauges (breaker, adaptive limit, queue) are
sampled then too (``observe/metrics_state.py``). Measured inside a gateway under load, a
request's share was 5.0 us counted at once through ``labels()``-cached children,
4.0 us through the accumulators, 2.4 us in batches (a warm loop).

Labels are bounded by construction (``metrics_state.Labels``): a model or provider
label takes only a name the config or discovery knows (anything else is ``other``), a
gateway key only its configured name; never a request id or anything else the client
chose. A labelled child (and its accumulator) is looked up once and kept in a dict
keyed by its label tuple: ``labels()`` takes a lock and validates on every call.

With ``proxy serve --workers N`` every worker writes its figures to files in one
directory per gateway (prometheus-client's multiprocess mode, ``metrics_state``), and
a scrape on any worker sums every worker's files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric

from proxy import __version__
from proxy.gateway import Live
from proxy.observe.metrics_pending import Pending, PendingCounter, PendingHistogram
from proxy.observe.metrics_state import (
    FLUSH_SECONDS,
    Labels,
    StateGauges,
    collect_all,
    registry_of_all,
    require_multiprocess,
)
from proxy.record import COMPLETED, Record

log = logging.getLogger("proxy.metrics")

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
RATE_LIMITED = "rate_limit_exceeded"  # ratelimit.RateLimited.code
# An upstream answer with one of these statuses failed (a 4xx is the caller's mistake,
# answered correctly; 429 is the upstream refusing).
_FAILED_UPSTREAM = 500
_REFUSED = 429


class Metrics:
    """Every metric of one gateway app, in ``registry`` (a fresh one per app, so two
    gateways in one process, as in the tests, never mix their figures).

    ``multiprocess_dir``: the supervisor's directory (``--workers N``); the scrape then
    sums every worker's files there instead of reading this process's registry."""

    def __init__(self, live: Live, multiprocess_dir: Path | None = None):
        if multiprocess_dir is not None:
            require_multiprocess()
        self.multiprocess_dir = multiprocess_dir
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.labels = Labels(live)
        self.pending = Pending()
        self._define(registry)
        self.state = StateGauges(live, registry)
        self._by_request: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._by_operation: dict[tuple[str, str, str], tuple[PendingHistogram, ...]] = {}
        self._counters: dict[tuple[Any, ...], PendingCounter] = {}
        self._overhead = self.pending.histogram(self.overhead)
        self._success = self._inc(self.attempts, "success")  # most requests' one attempt
        self.in_flight = 0  # requests being served here: core.Core counts them

    def _define(self, registry: CollectorRegistry) -> None:
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
        self.in_flight_gauge = Gauge(
            "gateway_requests_in_flight", "Requests being served (set at each flush).",
            registry=registry, multiprocess_mode="livesum")
        self.attempts = Counter(
            "gateway_upstream_attempts", "Upstream attempts by outcome.", ("outcome",),
            registry=registry)
        self.stream_endings = Counter(
            "gateway_stream_endings", "Streams by how they ended.", ("reason",),
            registry=registry)
        self.cache = Counter("gateway_cache_lookups", "Response cache lookups.",
                             ("result",), registry=registry)
        self.dedup = Counter("gateway_dedup_requests", "Shared requests by role.",
                             ("role",), registry=registry)
        self.rate_limited = Counter(
            "gateway_rate_limited_requests", "Requests refused by a key's rate limit.",
            ("key",), registry=registry)
        self.reloads = Counter("gateway_config_reloads", "Config reloads by result.",
                               ("result",), registry=registry)
        self.build_info = Gauge("gateway_build_info", "The running gateway's version.",
                                ("version",), registry=registry, multiprocess_mode="livemax")
        self.build_info.labels(__version__).set(1)

    def observe(self, records: list[Record]) -> None:
        """The observer (``observers.Observer``): a batch of ended requests."""
        for record in records:
            try:
                self._count(record)
            except Exception:  # one bad record loses itself, not its batch
                log.exception("metrics: a request could not be counted")

    def _count(self, record: Record) -> None:
        """One ended request. Each labelled child comes from a dict (see the module
        doc); only what the record says happened is counted, so a cache hit or a
        follower sends no upstream attempt. A request a peer worker forwarded here is
        that worker's to count (it answered the client): here only what happened
        here, the cache, dedup and upstream attempts."""
        if record.forwarded:
            self._upstream(record)
            return
        model, provider = self.labels.of(record.model, record.provider)
        status = record.status
        key = (record.method, record.path, model, provider, status)
        children = self._by_request.get(key)
        if children is None:
            children = self._by_request[key] = self._request_children(key)
        count, http, operation, first_chunk = children
        duration = record.finished - record.started
        count.inc()
        http.observe(duration)
        first = record.first_byte
        self._overhead.observe(record.overhead())
        if operation is not None:
            operation.observe(duration)
            if first_chunk is not None and first is not None:
                first_chunk.observe(first - record.started)
            usage = record.usage
            if usage is not None and usage.source == "reported":  # (not our guesses)
                self._tokens(record, model, provider)
        self._outcomes(record)

    def _request_children(self, key: tuple[Any, ...]) -> tuple[Any, ...]:
        method, path, model, provider, status = key
        code = str(status)
        pending = self.pending
        count = pending.counter(self.requests.labels(path, model, provider, code))
        http = pending.histogram(self.http_duration.labels(method, path, code))
        name = OPERATIONS.get(path)
        if name is None:
            return count, http, None, None
        operation = pending.histogram(self.operation_duration.labels(
            name, model, provider, "" if status < 400 else code))
        first_chunk = (pending.histogram(self.time_to_first_chunk.labels(name, model, provider))
                       if status < 400 else None)
        return count, http, operation, first_chunk

    def _tokens(self, record: Record, model: str, provider: str) -> None:
        usage = record.usage
        assert usage is not None
        key = (OPERATIONS[record.path], model, provider)
        children = self._by_operation.get(key)
        if children is None:
            children = self._by_operation[key] = tuple(
                self.pending.histogram(self.token_usage.labels(*key, kind))
                for kind in ("input", "output", "cached", "reasoning"))
        for child, count in zip(children, (usage.input, usage.output, usage.cached,
                                           usage.reasoning), strict=True):
            if count is not None:
                child.observe(count)

    def _outcomes(self, record: Record) -> None:
        """Stream endings, rate-limit refusals, then :meth:`_upstream`."""
        if record.stream and (record.status < 400 or record.ended != COMPLETED):
            self._inc(self.stream_endings, record.ended).inc()
        if record.error_code == RATE_LIMITED:
            self._inc(self.rate_limited, self.labels.key(record.key_name)).inc()
        self._upstream(record)

    def _upstream(self, record: Record) -> None:
        """Cache, dedup and attempts. Of a request's attempts, the last one succeeded or
        failed; each earlier one led to a retry, or to another deployment (failover) or
        model (fallback) when the answer came from one: the record knows how many there
        were and where the answer came from."""
        if record.cache is not None:
            self._inc(self.cache, record.cache).inc()
        if record.dedup is not None:
            self._inc(self.dedup, record.dedup).inc()
        origin = record.origin
        if (origin is None or record.cache == "hit" or record.dedup == "follower"
                or record.peer):
            return  # no upstream call of this request's own
        attempts = origin.attempts
        if attempts == 1 and record.upstream_status == 200:
            self._success.inc()
        elif attempts:
            earlier = attempts - 1
            if earlier:
                self._inc(self.attempts, origin.taken or "retry").inc(earlier)
            upstream = record.upstream_status
            failed = (upstream is None  # no answer at all: the last try failed too
                      or upstream >= _FAILED_UPSTREAM or upstream == _REFUSED)
            self._inc(self.attempts, "error" if failed else "success").inc()
        elif record.status in (502, 504):  # no try sent (refused before): count one
            self._inc(self.attempts, "error").inc()

    def _inc(self, counter: Counter, *labels: str) -> PendingCounter:
        key = (counter, *labels)
        inc = self._counters.get(key)
        if inc is None:
            inc = self._counters[key] = self.pending.counter(counter.labels(*labels))
        return inc

    def reloaded(self, result: str) -> None:
        """``Live``'s reload hook: "success", "refused" or "error"."""
        self._inc(self.reloads, result).inc()

    def flush(self) -> None:
        """What this worker saw since the last flush, and its state gauges, into
        prometheus-client (``observe/metrics_pending.py``); the records still waiting in
        ``observers.Observers`` are the caller's to flush first."""
        self.pending.flush()
        self.in_flight_gauge.set(self.in_flight)
        self.state.sample()

    async def flush_forever(self) -> None:
        """The background task (``app.py``): a flush every ``FLUSH_SECONDS``."""
        while True:
            try:
                self.flush()
            except Exception:  # a bad figure must not stop the next flushes
                log.exception("metrics flush failed")
            await asyncio.sleep(FLUSH_SECONDS)

    def collect(self) -> Iterable[Metric]:
        """Every metric family with its samples, every worker's summed in
        multiprocess mode (the status page reads these)."""
        self.flush()
        if self.multiprocess_dir is not None:
            return collect_all(self.multiprocess_dir)
        return self.registry.collect()

    def exposition(self) -> bytes:
        """The text format a Prometheus scrape gets."""
        self.flush()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        return generate_latest(registry_of_all(self.multiprocess_dir))


METRICS = web.AppKey("metrics", Metrics)  # GET /metrics, the status page (``app.py``)
