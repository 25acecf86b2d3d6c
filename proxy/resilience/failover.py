"""A request whose model several deployments serve, or that has fallbacks (issue #4).

The order tried: the model's deployments, least in flight first (ties take turns, so an
idle gateway still spreads its requests), skipping those whose circuit breaker is open;
then each fallback model's deployments the same way. When every one is open, the request
goes to the least bad (lowest failure ratio) anyway: Envoy's panic threshold, issue #9
(with ``breaker.fail_fast``, to the first, whose breaker answers 503 ``circuit_open``).
A deployment that fails (no connection, a timeout, an open circuit, its queue full, or
an answer of 429 or 5xx) hands the request to the next one at once, with no backoff:
another deployment is a better bet than the same one later. Only the last candidate
retries with its provider's retry policy, and its failure is what the client sees. All
of this happens before the client gets a byte: a failure mid-stream is never failed over.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping, Sequence

from proxy.answers import Answer, AnswerCall
from proxy.call import Call
from proxy.errors import CircuitOpen, Overloaded, UpstreamError
from proxy.record import Record
from proxy.resilience.attempt import UpstreamCall, Upstreams
from proxy.resilience.breaker import CircuitBreaker
from proxy.resilience.concurrency import AdaptiveLimiter
from proxy.routing import Route, Target

# Errors and statuses after which the next candidate is tried.
FAILOVER_ERRORS = (UpstreamError, CircuitOpen, Overloaded)
FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504})


class Balancer:
    """Orders a route's candidates; the turn counter is its only state (per worker)."""

    def __init__(self, limiters: Mapping[str, AdaptiveLimiter],
                 breakers: Mapping[str, CircuitBreaker]):
        self._limiters = limiters
        self._breakers = breakers
        self._turns = itertools.count()

    def candidates(self, route: Route) -> list[Target]:
        ordered: list[Target] = []
        for group in (route.deployments, *route.fallbacks):
            ordered.extend(self._least_loaded(group))
        if ordered:
            return ordered
        first = route.deployments[0]
        if self._breakers[first.provider.name].settings.fail_fast:
            return [first]  # so the client gets its circuit_open
        everyone = [t for group in (route.deployments, *route.fallbacks) for t in group]
        return [min(everyone, key=self._failure_ratio)]  # panic: stable, first on ties

    def _failure_ratio(self, target: Target) -> float:
        return self._breakers[target.provider.name].failure_ratio()

    def _least_loaded(self, group: Sequence[Target]) -> list[Target]:
        usable = [t for t in group if self._breakers[t.provider.name].available]
        if len(usable) < 2:
            return usable
        start = next(self._turns) % len(usable)
        rotated = usable[start:] + usable[:start]
        return sorted(rotated, key=self._load)  # stable: ties keep the rotated order

    def _load(self, target: Target) -> int:
        limiter = self._limiters[target.provider.name]
        return limiter.in_flight + limiter.queued


class FailoverCall(AnswerCall):
    """The candidates tried in turn; as an async context manager, the answer."""

    __slots__ = ("_call", "_current", "_primary", "_record", "_targets", "_tries", "_upstreams")

    def __init__(self, call: Call, targets: list[Target], upstreams: Upstreams,
                 record: Record | None, primary: Sequence[Target] = ()):
        """``primary``: the model's own deployments (the others are its fallbacks)."""
        self._call = call
        self._primary = primary
        self._tries = 0
        self._targets = targets
        self._upstreams = upstreams
        self._record = record
        super().__init__()
        self._current: UpstreamCall | None = None

    async def start(self) -> Answer:
        queued = time.perf_counter()
        try:
            return await self._first_good()
        finally:  # the legs that failed are upstream time too, not the gateway's
            record = self._record
            if record is not None:
                record.upstream_wait += time.perf_counter() - queued
                if record.origin is not None:  # (the answer's own replaces it)
                    record.origin.attempts = self._tries

    async def _first_good(self) -> Answer:
        last = len(self._targets) - 1
        for index, target in enumerate(self._targets):
            call = dataclasses.replace(self._call, upstream_model=target.upstream_model)
            upstream = self._upstreams.call(call, target.provider, None,
                                            may_retry=index == last)
            try:
                answer = await upstream.start()
            except FAILOVER_ERRORS:
                self._tries += upstream.tries
                if index == last:
                    raise
                continue
            self._tries += upstream.tries
            if index < last and answer.status in FAILOVER_STATUSES:
                upstream.finish(failed=False)  # an error answer is read whole
                continue
            self._current, self._answer = upstream, answer  # (it named its provider)
            if answer.origin is not None and index:
                answer.origin.attempts = self._tries
                answer.origin.taken = "failover" if target in self._primary else "fallback"
            return answer
        raise AssertionError("a route has at least one candidate")

    def finish(self, *, failed: bool) -> None:
        current, self._current = self._current, None
        if current is not None:
            current.finish(failed=failed)
