"""What ``observe/metrics.py`` needs besides the request counters: bounded label values, the
per-provider state gauges, and prometheus-client's multiprocess mode.

Labels (:class:`Labels`): the names the config in force and the discovery catalog know,
recomputed only when either changes (a reload, a new catalog snapshot), so a request
pays two identity checks and a set lookup.

State gauges (:class:`StateGauges`): a breaker turns half-open by the clock, not by an
event, and a limiter's queue changes on every request; so instead of hooks on the hot
path they are read every ``FLUSH_SECONDS`` by one background task per worker, and again
by the worker that answers a scrape.

Multiprocess mode (``--workers N``): prometheus-client picks how it stores values (in
memory, or in files under ``PROMETHEUS_MULTIPROC_DIR``) once, when ``prometheus_client``
is imported; the supervisor therefore puts the directory in each worker's environment
before it starts (``cli._supervise``: a fresh ``mkdtemp`` per gateway, removed at
exit), calls :func:`worker_gone` when a worker dies (its live gauges go; its counters
stay, so sums never go backwards), and a scrape sums every file (:func:`collect_all`).
Gauges use the ``live*`` modes: a dead worker's in-flight count is not counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, values
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from proxy.discovery import Snapshot
from proxy.gateway import Gateway, Live

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
OTHER = "other"  # any name the config and the catalog do not know
NONE = "none"  # no model (a GET /v1/files), no provider (refused before routing)
FLUSH_SECONDS = 1.0  # how often a worker hands its figures on (metrics_pending.py)
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class Labels:
    """Label values for models, providers and gateway keys (see the module doc)."""

    def __init__(self, live: Live):
        self._live = live
        self._gateway: Gateway | None = None
        self._snapshot: Snapshot | None = None
        self._models: frozenset[str] = frozenset()
        self._providers: frozenset[str] = frozenset()
        self._keys: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return (f"<Labels models={len(self._models)} providers={len(self._providers)} "
                f"keys={len(self._keys)}>")

    def of(self, model: str | None, provider: str | None) -> tuple[str, str]:
        """The ``model`` and ``provider`` label values of one request."""
        gateway = self._live.gateway
        if gateway is not self._gateway or gateway.catalog.snapshot is not self._snapshot:
            self._fresh()
        return (NONE if model is None else model if model in self._models else OTHER,
                NONE if provider is None else provider if provider in self._providers
                else OTHER)

    def key(self, name: str | None) -> str:
        self._fresh()
        return NONE if name is None else name if name in self._keys else OTHER

    def _fresh(self) -> None:
        gateway = self._live.gateway
        snapshot = gateway.catalog.snapshot
        if gateway is self._gateway and snapshot is self._snapshot:
            return
        self._gateway, self._snapshot = gateway, snapshot
        config = gateway.config
        self._providers = frozenset(p.name for p in config.providers)
        self._keys = frozenset(key.name for key in config.auth.keys)
        self._models = frozenset(_model_names(gateway, snapshot))


def _model_names(gateway: Gateway, snapshot: Snapshot | None) -> Iterable[str]:
    """Every name a client may send that the gateway knows: aliases, deployments and
    fallbacks, each provider's static and discovered models, bare and prefixed."""
    config = gateway.config
    yield from config.aliases
    yield from config.deployments
    for model, fallbacks in config.fallbacks.items():
        yield model
        yield from fallbacks
    served = [(p.name, p.models) for p in config.providers]
    if snapshot is not None:
        served += [(s.provider, s.models) for s in snapshot.statuses]
    for provider, models in served:
        for model in models:
            yield model
            yield f"{provider}/{model}"


class StateGauges:
    """Each provider's breaker state, adaptive limit, queue length and upstream
    requests in flight, as this worker's limiters and breakers hold them."""

    def __init__(self, live: Live, registry: CollectorRegistry):
        self._live = live
        provider = ("provider",)
        self.breaker = Gauge(
            "gateway_circuit_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open (the worst worker's).",
            provider, registry=registry, multiprocess_mode="livemax")
        self.limit = Gauge("gateway_concurrency_limit",
                           "Adaptive concurrency limit (summed over workers).", provider,
                           registry=registry, multiprocess_mode="livesum")
        self.queued = Gauge("gateway_concurrency_queue_length",
                            "Requests waiting for an upstream slot.", provider,
                            registry=registry, multiprocess_mode="livesum")
        self.upstream_in_flight = Gauge(
            "gateway_upstream_requests_in_flight", "Upstream requests holding a slot.",
            provider, registry=registry, multiprocess_mode="livesum")
        self._gauges = (self.breaker, self.limit, self.queued, self.upstream_in_flight)
        self._shown: set[str] = set()

    def __repr__(self) -> str:
        return f"<StateGauges providers={sorted(self._shown)}>"

    def sample(self) -> None:
        """Read every provider's state now (a few dozen attribute reads)."""
        dispatcher = self._live.gateway.dispatcher
        for name, limiter in dispatcher.limiters.items():
            state = limiter.snapshot()
            self.limit.labels(name).set(state["limit"])
            self.queued.labels(name).set(state["queued"])
            self.upstream_in_flight.labels(name).set(state["in_flight"])
        for name, breaker in dispatcher.breakers.items():
            self.breaker.labels(name).set(BREAKER_STATES.get(breaker.state, 2))
        shown = set(dispatcher.limiters) | set(dispatcher.breakers)
        for gone in self._shown - shown:  # a reload removed it: zero (the files), drop
            for gauge in self._gauges:
                gauge.labels(gone).set(0)
                gauge.remove(gone)
        self._shown = shown


def require_multiprocess() -> None:
    """Fail at start-up, not with wrong sums, when the directory came too late."""
    if values.ValueClass is values.MutexValue:
        raise RuntimeError(f"{MULTIPROC_ENV} must be set before prometheus_client is "
                           "imported (the supervisor puts it in the workers' environment)")


def collect_all(directory: Path) -> Iterable[Metric]:
    """Every worker's figures, summed (live gauges: the live workers' only)."""
    collector = MultiProcessCollector(None, str(directory))  # type: ignore[no-untyped-call]
    collected: Iterable[Metric] = collector.collect()  # type: ignore[no-untyped-call]
    return collected


def registry_of_all(directory: Path) -> CollectorRegistry:
    """A fresh registry holding only every worker's summed files, read at collection."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(directory))  # type: ignore[no-untyped-call]
    return registry


def worker_gone(directory: Path, pid: int) -> None:
    """The supervisor's hook for a dead worker: its live gauges stop counting."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
