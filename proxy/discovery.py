"""Parallel model discovery and provider health, cached and refreshed in the background.

Every provider is asked at once, each under its own deadline, so discovery takes as long
as the slowest provider, not the sum (5 providers of 0.5 s: about 0.5 s, not 2.5 s), and
a provider that fails or hangs is reported beside the others instead of failing them.

Results are kept for ``models_cache_ttl``; after that the stale result is still served
while one refresh runs in the background (stale-while-revalidate), so only the very
first request of a worker ever waits for discovery. Concurrent callers share one refresh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.errors import GatewayError
from proxy.providers import Provider
from proxy.tasks import BackgroundTasks
from proxy.upstream.client import UpstreamClient


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    provider: str
    type: str
    healthy: bool
    latency_ms: float
    models: tuple[str, ...]
    error: str | None
    checked_at: float  # wall clock, for display
    # Reachable, but lists its models only with each caller's own key (drop-in mode).
    caller_key: bool = False
    # The upstream's own entries (created, owned_by) when listed for one caller.
    entries: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Snapshot:
    statuses: tuple[ProviderStatus, ...]
    taken_at: float  # monotonic

    def status(self, provider: str) -> ProviderStatus | None:
        return next((s for s in self.statuses if s.provider == provider), None)


CALLER_TTL = 5.0  # seconds a caller's own listing is reused (issue 9: never across callers)
CALLER_ENTRIES = 256  # callers remembered at once


def takes_caller_key(provider: Provider) -> bool:
    """The drop-in (``--upstream``, or any ``catch_all`` provider): no key of its own and
    the client's ``Authorization`` forwarded, so each client sends its own upstream key.
    Any other keyless provider that refuses a listing is reported as failing (a key the
    operator forgot: ``proxy check`` must say so)."""
    config = provider.config
    return (config.catch_all and config.forward_client_auth and not config.api_key_env
            and not config.api_key)


class ModelCatalog:
    """What every provider serves, and whether it answered, as of the last refresh."""

    def __init__(self, providers: Sequence[Provider], client: UpstreamClient,
                 tasks: BackgroundTasks, *, ttl: float, timeout: float,
                 retry_failed_after: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_probe: Callable[[ProviderStatus], None] | None = None):
        self._providers = tuple(providers)
        self._client = client
        self._tasks = tasks
        self._ttl = ttl
        self._retry_failed_after = min(ttl, retry_failed_after)
        self._timeout = timeout
        self._clock = clock
        # Told of each provider as soon as it answered (the CLI's progress lines).
        self._on_probe = on_probe
        self._snapshot: Snapshot | None = None
        self._refresh: asyncio.Task[Snapshot] | None = None
        self._last_errors: dict[str, str] = {}
        # sha256(provider, caller's Authorization) -> (taken at, that caller's status)
        self._callers: dict[bytes, tuple[float, ProviderStatus]] = {}

    def __repr__(self) -> str:
        age = None if self._snapshot is None else round(self._clock() - self._snapshot.taken_at)
        return (f"<ModelCatalog providers={len(self._providers)} age_s={age} "
                f"refreshing={self._refresh is not None}>")

    @property
    def snapshot(self) -> Snapshot | None:
        """The latest result, without waiting; ``None`` before the first refresh."""
        return self._snapshot

    def last_error(self, provider: str) -> str | None:
        """The most recent error of ``provider``, kept after it recovered."""
        return self._last_errors.get(provider)

    async def current(self) -> Snapshot:
        """The cached result; waits only when there is none yet. A stale result is
        returned at once and refreshed in the background."""
        if self._snapshot is None:
            return await self.refresh()
        if self._stale(self._snapshot):
            self._start_refresh()
        return self._snapshot

    def _stale(self, snapshot: Snapshot) -> bool:
        """Past the TTL; or, when a provider failed, past the short retry delay, so one
        failed probe at start-up does not hide a provider's models for a whole TTL."""
        age = self._clock() - snapshot.taken_at
        failed = any(not s.healthy for s in snapshot.statuses)
        return age >= self._ttl or (failed and age >= self._retry_failed_after)

    async def fresh(self, max_age: float) -> Snapshot:
        """A result at most ``max_age`` seconds old (``/health``), refreshing if needed."""
        if self._snapshot is not None and self._clock() - self._snapshot.taken_at < max_age:
            return self._snapshot
        return await self.refresh()

    def inherit(self, old: ModelCatalog, unchanged: Collection[str]) -> None:
        """After a reload: keep what ``old`` knew of the providers in ``unchanged``, their
        last errors always, and the whole result when every provider is unchanged (so a
        reload that only changed keys or aliases never makes requests wait for, or lose
        models to, a fresh discovery)."""
        self._last_errors = {name: error for name, error in old._last_errors.items()
                             if name in unchanged}
        names = {p.name for p in self._providers}
        if old._snapshot is not None and names <= set(unchanged):
            self._snapshot = Snapshot(tuple(s for s in old._snapshot.statuses
                                            if s.provider in names), old._snapshot.taken_at)

    def refresh_soon(self) -> None:
        """Ask for a background refresh (an unknown model may have just appeared)."""
        self._start_refresh()

    async def refresh(self) -> Snapshot:
        """Ask every provider now. Shielded: a caller that goes away does not cancel a
        refresh other callers wait on."""
        return await asyncio.shield(self._start_refresh())

    async def for_caller(self, snapshot: Snapshot, authorization: str) -> Snapshot:
        """``snapshot`` with each provider that lists only with the caller's key listed
        with ``authorization`` (kept ``CALLER_TTL`` s under a hash of it, never shared)."""
        statuses = await asyncio.gather(*(
            self._caller_status(s, authorization) if s.caller_key else _same(s)
            for s in snapshot.statuses))
        return Snapshot(tuple(statuses), snapshot.taken_at)

    async def _caller_status(self, status: ProviderStatus, authorization: str
                             ) -> ProviderStatus:
        key = hashlib.sha256(f"{status.provider}\0{authorization}".encode()).digest()
        now = self._clock()
        cached = self._callers.get(key)
        if cached is not None and now - cached[0] < CALLER_TTL:
            return cached[1]
        provider = next(p for p in self._providers if p.name == status.provider)
        started = time.perf_counter()
        entries: list[dict[str, Any]] = []
        error, _ = await self._guarded(provider.list_models_as(self._client, authorization),
                                       entries)
        found = dataclasses.replace(
            status, healthy=error is None, error=error, models=tuple(e["id"] for e in entries),
            entries={e["id"]: e for e in entries}, checked_at=time.time(),
            latency_ms=round((time.perf_counter() - started) * 1000, 1))
        if len(self._callers) >= CALLER_ENTRIES:
            self._callers = {k: v for k, v in self._callers.items() if now - v[0] < CALLER_TTL}
            if len(self._callers) >= CALLER_ENTRIES:
                self._callers.pop(next(iter(self._callers)))
        self._callers[key] = (now, found)
        return found

    async def _guarded(self, listing: Awaitable[Sequence[Any]], into: list[Any]
                       ) -> tuple[str | None, str | None]:
        """Await ``listing`` under the discovery deadline into ``into``; the error's
        message and code, if any."""
        try:
            into.extend(await asyncio.wait_for(listing, self._timeout))
        except TimeoutError:
            return f"no answer within {self._timeout:g} s", None
        except GatewayError as exc:
            return exc.message, exc.code
        except Exception as exc:  # one provider's bug must not fail the rest
            return f"discovery failed ({type(exc).__name__})", None
        return None, None

    def _start_refresh(self) -> asyncio.Task[Snapshot]:
        if self._refresh is None:
            self._refresh = self._tasks.spawn(self._run_refresh(), name="model-discovery")
        return self._refresh

    async def _run_refresh(self) -> Snapshot:
        try:
            statuses = await asyncio.gather(*(self._probe(p) for p in self._providers))
            self._snapshot = Snapshot(tuple(statuses), self._clock())
            return self._snapshot
        finally:
            self._refresh = None

    async def _probe(self, provider: Provider) -> ProviderStatus:
        started = time.perf_counter()
        error: str | None = None
        models: list[str] = []
        caller_key = False
        if provider.config.api_key_missing:
            error = f"API key missing: environment variable {provider.config.api_key_env} is unset"
        else:
            error, code = await self._guarded(provider.list_models(self._client), models)
            # Refused without a key by a provider that gets each caller's own: it answered,
            # so it is up (issue 9: the drop-in's /health was a 503, its listing empty).
            caller_key = code == "upstream_auth_failed" and takes_caller_key(provider)
            if caller_key:
                error = None
        if error is not None:
            self._last_errors[provider.name] = error
        status = ProviderStatus(
            provider=provider.name, type=provider.type_name, healthy=error is None,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
            models=tuple(models), error=error, checked_at=time.time(), caller_key=caller_key)
        if self._on_probe is not None:
            self._on_probe(status)
        return status


async def _same(status: ProviderStatus) -> ProviderStatus:
    return status
