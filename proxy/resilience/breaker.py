"""A circuit breaker per provider (issues #4, #9): steer traffic away from an upstream
that is down, and never make an outage of the gateway's own.

Evidence: only what says the upstream itself is unhealthy fails a call (:func:`fault`):
no connection, a connection cut midway, the connect deadline or a stream's headers
deadline, an answer of 502, 503 or 504. A 500 (often one request's content), a 429
(pacing), a first-token, stall or total deadline or a non-stream request's headers
deadline (one long generation), a client leaving or a full gateway pool say nothing
against the upstream.

States: *closed* until, over the last ``window`` seconds, at least ``min_requests`` calls
were judged, at least ``failure_ratio`` of them failed, and the failures came from at
least ``min_callers`` distinct callers (resilience4j's ``minimumNumberOfCalls`` and
``failureRateThreshold``; the callers rule keeps one tenant's bad requests from opening
it for everyone, issue #9), or connection failures alone reached the ratio (a dead host,
whoever asks). Then *open* for ``cooldown`` seconds, then *half-open*: one
probe at a time, whose success closes it and whose failure opens it again.

An open breaker only steers: routing sends requests to another deployment. When every
candidate is open the request is sent anyway (Envoy's panic threshold), and a panic
request that succeeds closes the breaker; ``fail_fast: true`` answers 503
``circuit_open`` instead. The window is ten buckets, so a request costs O(1).
State is per worker.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from typing import Any

from proxy.config.breaker import BreakerSettings
from proxy.errors import (
    CircuitOpen,
    FirstTokenTimeout,
    HeadersTimeout,
    PoolTimeout,
    RequestTimeout,
    StreamStalled,
    UpstreamError,
)

FAILURE_STATUSES = frozenset({502, 503, 504})
# Deadlines one request's own length explains (a long generation), and a full pool of
# this worker: they say nothing about the upstream's health.
_NOT_FAULTS = (PoolTimeout, FirstTokenTimeout, StreamStalled, RequestTimeout)
BUCKETS = 10


def fault(exc: BaseException, stream: bool = True) -> bool | None:
    """True when ``exc`` says the upstream is unhealthy, None when it says nothing. A
    non-stream answer's headers come once it is generated, so for it the headers
    deadline is one long answer's length too, not a sign of ill health."""
    if not isinstance(exc, UpstreamError) or isinstance(exc, _NOT_FAULTS):
        return None
    if not stream and isinstance(exc, HeadersTimeout):
        return None
    return True


class Pass(enum.Enum):
    """How ``check`` let a request through; ``record`` takes it back."""

    CLOSED = "closed"  # the circuit was closed
    PROBE = "probe"  # the half-open probe
    PANIC = "panic"  # open, sent anyway: no other candidate


class _Bucket:
    __slots__ = ("broken", "callers", "calls", "epoch", "failures")

    def __init__(self) -> None:
        self.epoch = -1
        self.calls = self.failures = 0
        self.broken = 0  # failures of the connection itself
        self.callers: set[str] = set()  # failing callers, at most min_callers kept


class CircuitBreaker:
    def __init__(self, name: str, settings: BreakerSettings,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.settings = settings
        self._clock = clock
        self._width = settings.window / BUCKETS
        self._buckets = [_Bucket() for _ in range(BUCKETS)]
        self._opened_at: float | None = None
        self._probing = False
        self.opened = 0  # times it opened, for /health
        self.panicked = 0  # requests sent through an open circuit, for /health

    def __repr__(self) -> str:
        calls, failures, _, _ = self._totals()
        return f"<CircuitBreaker {self.name!r} {self.state} {failures}/{calls} failed>"

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._clock() >= self._opened_at + self.settings.cooldown \
            else "open"

    @property
    def available(self) -> bool:
        """Whether a request may go now without panic (closed, or half-open with no
        probe out): routing prefers available deployments."""
        if self._opened_at is None:
            return True
        return not self._probing and self._clock() >= self._opened_at + self.settings.cooldown

    def failure_ratio(self) -> float:
        """The window's failed share of judged calls: routing's "least bad" in panic."""
        calls, failures, _, _ = self._totals()
        return failures / calls if calls else 0.0

    def check(self) -> Pass:
        """Before a request: how it goes (its ``record`` needs that back); raises
        ``CircuitOpen`` only with ``fail_fast``."""
        if self._opened_at is None:
            return Pass.CLOSED
        left = self._opened_at + self.settings.cooldown - self._clock()
        if left <= 0 and not self._probing:
            self._probing = True
            return Pass.PROBE
        if self.settings.fail_fast:
            raise CircuitOpen(self.name, max(left, self.settings.cooldown / 10))
        self.panicked += 1
        return Pass.PANIC

    def record(self, *, failed: bool | None, how: Pass = Pass.CLOSED,
               caller: str = "", connection: bool = False) -> None:
        """After a request: ``failed`` None when it says nothing (see :func:`fault`);
        ``how`` is what ``check`` returned; ``caller`` who sent it (no secret);
        ``connection`` when the failure is the connection's (refused, cut, a connect or
        headers deadline), which no request's content explains: those need no second
        caller (one application on one key must still be steered off a dead host)."""
        if how is Pass.PROBE:
            self._probing = False
        if failed is None:
            return
        if self._opened_at is None:
            self._count(failed, caller, connection)
            if failed and self.settings.enabled and self._tripped():
                self._open()
        elif not failed:
            if how is not Pass.CLOSED:  # a probe or panic request: it recovered
                self._opened_at, self._probing = None, False
                self._buckets = [_Bucket() for _ in range(BUCKETS)]
            # else begun before the circuit opened (a long stream): not news
        else:
            self._count(True, caller, connection)
            self._open()  # still failing: the cooldown starts again

    def _open(self) -> None:
        if self._opened_at is None or self.state == "half_open":
            self.opened += 1
        # A probe still out from before is not this opening's: after the new cooldown
        # a new probe may go (else routing skipped it until the old one's head came).
        self._opened_at, self._probing = self._clock(), False

    def _count(self, failed: bool, caller: str, connection: bool) -> None:
        epoch = int(self._clock() / self._width)
        bucket = self._buckets[epoch % BUCKETS]
        if bucket.epoch != epoch:
            bucket.epoch, bucket.calls, bucket.failures, bucket.broken = epoch, 0, 0, 0
            bucket.callers.clear()
        bucket.calls += 1
        if failed:
            bucket.failures += 1
            bucket.broken += connection
            if len(bucket.callers) < self.settings.min_callers:
                bucket.callers.add(caller)

    def _totals(self) -> tuple[int, int, int, int]:
        """Judged calls, failures, distinct failing callers (capped at ``min_callers``:
        a bucket keeps no more, which is all the rule needs) and connection failures."""
        oldest = int(self._clock() / self._width) - BUCKETS
        calls = failures = broken = 0
        callers: set[str] = set()
        for bucket in self._buckets:
            if bucket.epoch > oldest:
                calls += bucket.calls
                failures += bucket.failures
                broken += bucket.broken
                callers |= bucket.callers
        return calls, failures, len(callers), broken

    def _tripped(self) -> bool:
        """Enough calls, and a failure ratio over the threshold: from ``min_callers``
        callers, or of connection failures alone (a dead host, whoever asks)."""
        settings = self.settings
        calls, failures, callers, broken = self._totals()
        if calls < settings.min_requests:
            return False
        threshold = settings.failure_ratio * calls
        return (failures >= threshold and callers >= settings.min_callers) \
            or broken >= threshold

    def snapshot(self) -> dict[str, Any]:
        calls, failures, callers, _ = self._totals()
        return {"state": self.state, "opened_total": self.opened,
                "panic_total": self.panicked,
                "window": {"seconds": self.settings.window, "calls": calls,
                           "failures": failures, "failing_callers": callers}}
