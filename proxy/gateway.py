"""What a config decides, built as one unit so that SIGHUP can swap it (issue #4).

A :class:`Gateway` holds the config and what is built from it: gateway keys, providers,
the model router, the catalog and the dispatcher. ``Live.gateway`` is the one in force;
a handler reads it once, so a request runs start to end on one consistent set even if a
reload lands meanwhile, and in-flight requests and streams finish on the set they began.

What lives longer than one config is in :class:`Shared` (built once per worker): the
upstream connection pool, background tasks, the in-flight and cache maps, the rate-limit
buckets. Per-provider state (its concurrency limit, circuit breaker, retry budget) is
carried over to the new set when that provider and those settings are unchanged, so a
reload neither forgets a failing upstream nor resets a learnt limit. Sections that size
what is built once (``server``, ``pool``, ``timeouts``, ``dedup``, ``cache``,
``redis`` and ``auth.limits_backend``) need a restart: a reload keeps their running
values and logs which ones differ.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from proxy.auth import KeyRing
from proxy.config.loader import Config, ConfigError
from proxy.discovery import ModelCatalog
from proxy.dispatch import Dispatcher
from proxy.failure_log import FailureLog
from proxy.providers import Provider, build_provider
from proxy.resilience.breaker import CircuitBreaker
from proxy.resilience.concurrency import AdaptiveLimiter
from proxy.resilience.ratelimit import RateLimiter
from proxy.resilience.retry import RetryPolicy
from proxy.routing import ModelRouter
from proxy.sharing.cache import AnswerCache
from proxy.sharing.dedup import InflightRequests
from proxy.sharing.peers import Peers
from proxy.tasks import BackgroundTasks
from proxy.upstream.client import UpstreamClient

log = logging.getLogger("proxy.gateway")

T = TypeVar("T")
RESTART_ONLY = ("server", "pool", "timeouts", "dedup", "cache", "redis")


@dataclass(frozen=True, slots=True)
class Shared:
    """A worker's long-lived parts, shared by every config it runs."""

    client: UpstreamClient
    tasks: BackgroundTasks
    inflight: InflightRequests
    cache: AnswerCache
    peers: Peers
    rate_limiter: RateLimiter
    failures: FailureLog = field(default_factory=FailureLog)


@dataclass(frozen=True, slots=True)
class Gateway:
    config: Config
    keyring: KeyRing
    router: ModelRouter
    catalog: ModelCatalog
    dispatcher: Dispatcher
    # Done once this gateway is in force: new limiters take over the pool's caps.
    claims: tuple[Callable[[], None], ...] = ()

    def put_in_force(self) -> None:
        for claim in self.claims:
            claim()


class Live:
    """The gateway in force, and how to replace it."""

    def __init__(self, shared: Shared, config: Config):
        self.shared = shared
        self.gateway = build_gateway(config, shared, None)
        self.gateway.put_in_force()
        self.reloads = 0
        # Told how each SIGHUP reload went: "success", "refused" or "error" (metrics).
        self.reload_hooks: list[Callable[[str], None]] = []

    def __repr__(self) -> str:
        return f"<Live reloads={self.reloads} source={self.gateway.config.source!r}>"

    def reloaded(self, result: str) -> None:
        """``server._reload`` says how a reload went, success or not."""
        for hook in self.reload_hooks:
            hook(result)

    def reload(self, new: Config) -> Gateway:
        """Put ``new`` in force (already validated); returns the new gateway. Raises
        :class:`ConfigError` (nothing swapped) when ``new`` would drop every gateway key
        without saying so."""
        running = self.gateway.config
        if running.auth.keys and not new.auth.keys:
            if not new.auth.open_on_purpose:
                raise ConfigError(["auth.keys: the new config has no gateway keys, which "
                                   "would open this gateway to anyone; write `keys: []` "
                                   "under `auth` to mean it"])
            log.warning("reload: no gateway keys configured any more (auth.keys: []): "
                        "anyone who can reach this gateway may now use it")
        kept: dict[str, Any] = {name: getattr(running, name) for name in RESTART_ONLY}
        changed = [name for name, value in kept.items() if getattr(new, name) != value]
        backend = running.auth.limits_backend  # the rate limiter is built once
        if new.auth.limits_backend != backend:
            changed.append("auth.limits_backend")
        kept["auth"] = dataclasses.replace(new.auth, limits_backend=backend)
        if changed:
            log.warning("reload: changed, but only a restart applies them: %s; keeping "
                        "the running values", ", ".join(changed))
        effective = dataclasses.replace(new, **kept)
        gateway = build_gateway(effective, self.shared, self.gateway)  # may raise: no swap
        self.shared.client.use_providers(effective)
        self.gateway = gateway
        gateway.put_in_force()
        if gateway.catalog.snapshot is None:  # not inherited: some provider changed
            gateway.catalog.refresh_soon()
        self.reloads += 1
        names = ", ".join(p.name for p in new.providers)
        log.info("reload: config from %s in force; providers: %s; %d gateway keys",
                 new.source, names, len(new.auth.keys))
        return self.gateway


def build_gateway(config: Config, shared: Shared, previous: Gateway | None) -> Gateway:
    providers = [build_provider(p) for p in config.providers]
    catalog = ModelCatalog(providers, shared.client, shared.tasks,
                           ttl=config.models_cache_ttl, timeout=config.timeouts.discovery,
                           retry_failed_after=config.health_cache_ttl)
    router = ModelRouter(providers, config.aliases, catalog, config.deployments,
                         config.fallbacks)
    unchanged = _unchanged_providers(config, previous)
    if previous is not None:
        catalog.inherit(previous.catalog, unchanged)
    claims: list[Callable[[], None]] = []
    dispatcher = _dispatcher(config, shared, providers, previous, unchanged, claims)
    return Gateway(config, KeyRing(config.auth.keys), router, catalog, dispatcher,
                   tuple(claims))


def _unchanged_providers(config: Config, previous: Gateway | None) -> set[str]:
    """The providers whose entry a reload left as it was: their state may be kept."""
    if previous is None:
        return set()
    before = previous.config
    return {p.name for p in config.providers if before.provider(p.name) == p}


def _dispatcher(config: Config, shared: Shared, providers: list[Provider],
                previous: Gateway | None, unchanged: set[str],
                claims: list[Callable[[], None]]) -> Dispatcher:
    """``claims``: what the new limiters' pool followers need done once in force."""
    kept_limiters: Mapping[str, AdaptiveLimiter] = {}
    kept_retries: Mapping[str, RetryPolicy] = {}
    kept_breakers: Mapping[str, CircuitBreaker] = {}
    if previous is not None:  # each kind of state, unless its own settings changed
        old, before = previous.dispatcher, previous.config
        kept_limiters = _carried(old.limiters, unchanged, before.limits == config.limits)
        kept_retries = _carried(old.retries, unchanged, before.retries == config.retries)
        kept_breakers = _carried(old.breakers, unchanged, before.breaker == config.breaker)
    settings = config.limits
    client = shared.client
    limiters: dict[str, AdaptiveLimiter] = {}
    for p in providers:
        limiter = kept_limiters.get(p.name)
        if limiter is None:
            follower = client.limit_follower(p.base_url, p.tls, p.name, settings.start)
            claims.append(follower.claim)
            limiter = AdaptiveLimiter(p.name, settings, on_limit_change=follower)
        limiters[p.name] = limiter
    retries = {p.name: kept_retries.get(p.name) or RetryPolicy(config.retries)
               for p in providers}
    breakers = {p.name: kept_breakers.get(p.name) or CircuitBreaker(p.name, config.breaker)
                for p in providers}
    return Dispatcher(client, shared.tasks, shared.inflight, shared.cache, limiters,
                      config.dedup.max_buffer_bytes, shared.peers, retries, breakers)


def _carried(states: Mapping[str, T], unchanged: set[str], same_settings: bool
             ) -> dict[str, T]:
    """The previous gateway's state of the unchanged providers, if its settings held."""
    return {name: state for name, state in states.items()
            if name in unchanged} if same_settings else {}
