"""Per-provider adaptive concurrency limits, with a bounded queue that sheds load early.

An upstream that slows down under load needs fewer concurrent requests, not more (issue
#3, "Adaptive connection limits"). Each provider gets an ``AdaptiveLimiter`` whose limit a
controller moves between ``LimitSettings.min`` and ``max``. Requests over the limit wait in
a FIFO queue of ``queue_size`` for at most ``queue_timeout`` seconds; when the queue is full
or the deadline passes they fail at once with ``Overloaded`` (503 + ``Retry-After``), so
the excess is answered in milliseconds instead of piling up into timeouts, and admitted
requests keep a bounded p99.

The controller joins two published designs:

* **Gradient** (Envoy's adaptive concurrency filter; Netflix concurrency-limits'
  Gradient2). Every ``update_interval`` the mean latency of that interval's successes
  (``rtt``) is compared with ``min_rtt``, the lowest such mean of the last one to two
  windows of ``min_rtt_window`` seconds::

      gradient = clamp(tolerance * min_rtt / rtt, 0.5, 1.0)
      target   = limit * gradient + (sqrt(limit) if the limit was reached else 0)
      limit    = limit + smoothing * (target - limit)

  Latency within ``tolerance`` of the baseline leaves the limit alone; beyond it
  (requests are queueing inside the upstream) the limit shrinks. The ``sqrt(limit)``
  headroom is the additive increase, added only when in-flight requests reached the limit
  during the interval, i.e. the limit was the bottleneck. An interval that used fewer
  than half the slots says nothing about the limit and is skipped (Gradient2's
  app-limited rule), so a quiet night does not erode it.
* **Multiplicative decrease** (TCP's AIMD, RFC 5681): an ``OVERLOAD`` (429/503) or
  ``ERROR`` (connection failure, timeout) multiplies the limit by ``backoff``, at most once
  per round trip (``min_rtt``, at least ``update_interval``): a cut only shows once the
  requests admitted before it have finished, and one cut per failure of a burst would
  collapse the limit to ``min``.

Unlike Envoy we never drop concurrency to a few requests to probe an unloaded min RTT: a
gateway would shed real traffic for it. The baseline is instead the best *interval mean*
of two rotating windows (O(1)): a mean of many requests, like Envoy's percentile of
``request_count`` samples, not one lucky short answer; and it follows an upstream that
became permanently slower within two windows. LLM latency grows with answer length, so
the signal is noisy: streams should report the time to response headers
(``Permit.answered``), and ``tolerance`` defaults to Gradient2's ``rttTolerance`` of 1.5.

State is per worker: each worker process adapts its own limiters independently. The
controller reads the injectable ``clock``; queue deadlines run on the event loop's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from proxy.errors import GatewayError, UpstreamError

# The OpenAI SDKs honour a Retry-After of up to 60 s (newer ones 120 s); past that they
# would use their own backoff, so a larger figure would only be ignored.
_MAX_RETRY_AFTER = 60
_HOLD_WEIGHT = 0.1  # EWMA weight of one release in the hold time behind Retry-After


@dataclass(frozen=True)
class LimitSettings:
    """One provider's limiter settings; validated here, mapped from config elsewhere.

    ``tolerance``: how far the interval latency may exceed the baseline before the limit
    shrinks (1.5 = 50 %); ``slack``: seconds more it may exceed it by in any case (see
    ``_update``). ``smoothing``: the share of each gradient step applied (0.2, as
    Gradient2). ``backoff``: the factor applied on 429/503/connection errors (0.9).
    ``update_interval``: seconds between gradient steps (Envoy's
    ``concurrency_update_interval``). ``min_rtt_window``: seconds after which the baseline
    starts forgetting old latencies.
    """

    initial: int = 64
    min: int = 4
    max: int = 1024
    queue_size: int = 1024
    queue_timeout: float = 2.0
    tolerance: float = 1.5
    slack: float = 0.01
    smoothing: float = 0.2
    backoff: float = 0.9
    update_interval: float = 0.1
    min_rtt_window: float = 30.0

    def __post_init__(self) -> None:
        bad = [name for name, wrong in (
            ("min", self.min < 1), ("max", self.max < self.min),
            ("initial", not self.min <= self.initial <= self.max),
            ("queue_size", self.queue_size < 0), ("queue_timeout", self.queue_timeout <= 0),
            ("tolerance", self.tolerance < 1), ("slack", self.slack < 0),
            ("smoothing", not 0 < self.smoothing <= 1),
            ("backoff", not 0 < self.backoff < 1),
            ("update_interval", self.update_interval <= 0),
            ("min_rtt_window", self.min_rtt_window <= 0),
        ) if wrong]
        if bad:
            raise ValueError(f"invalid limit settings: {', '.join(bad)}")


class Outcome(enum.Enum):
    """What one upstream request says about the upstream's capacity."""

    SUCCESS = "success"    # it answered: the latency feeds the gradient
    OVERLOAD = "overload"  # it answered 429 or 503: multiplicative decrease
    ERROR = "error"        # connection error or timeout: decrease; the latency is ignored
    IGNORE = "ignore"      # the client went away: the slot frees, nothing is learnt


def outcome_for_status(status: int) -> Outcome:
    return Outcome.OVERLOAD if status in (429, 503) else Outcome.SUCCESS


def outcome_for_exception(exc: BaseException) -> Outcome:
    """Translated upstream failures (``UpstreamClient.open`` raises ``UpstreamError``) and
    timeouts count against the upstream; cancellation, the client's connection dropping
    or a gateway bug say nothing about it, so they must not shrink its limit."""
    return Outcome.ERROR if isinstance(exc, (UpstreamError, TimeoutError)) else Outcome.IGNORE


class Overloaded(GatewayError):
    """503: a provider's limit and queue are full, or its queue deadline passed.

    ``type`` stays ``server_error``, what OpenAI sends with its own 5xx, so SDKs treat it
    as a retryable server error. ``retry_after`` is whole seconds (1 to 60) because the
    ``Retry-After`` delay-seconds form is an integer (RFC 9110 section 10.2.3).
    """

    status = 503
    code = "gateway_overloaded"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(int(self.retry_after))}


class Permit:
    """One granted slot. ``release`` frees it exactly once; a second call is a no-op so
    cleanup paths need not track whether someone released already."""

    __slots__ = ("_limiter", "_released", "_start", "latency", "outcome")

    def __init__(self, limiter: AdaptiveLimiter, start: float):
        self._limiter = limiter
        self._start = start
        self._released = False
        self.outcome: Outcome | None = None  # read by ``slot()`` on exit
        self.latency: float | None = None

    def answered(self, status: int) -> None:
        """Call when the upstream's status arrives: the outcome follows the status and the
        latency is fixed now, so a long stream afterwards is not mistaken for slowness."""
        self.outcome = outcome_for_status(status)
        self.latency = self._limiter._clock() - self._start

    def release(self, outcome: Outcome, latency: float | None = None) -> None:
        """Free the slot; ``latency`` defaults to the time the slot was held."""
        if self._released:
            return
        self._released = True
        now = self._limiter._clock()
        held = now - self._start
        self._limiter._release(outcome, held if latency is None else latency, held, now)


class _Slot:
    """``async with limiter.slot() as permit``: an outcome the caller set wins; otherwise
    a clean exit is SUCCESS and an exception is judged by ``outcome_for_exception``."""

    __slots__ = ("_limiter", "_permit")

    def __init__(self, limiter: AdaptiveLimiter):
        self._limiter = limiter

    async def __aenter__(self) -> Permit:
        self._permit = await self._limiter.acquire()
        return self._permit

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        permit = self._permit
        outcome = permit.outcome
        if outcome is None:
            outcome = Outcome.SUCCESS if exc is None else outcome_for_exception(exc)
        permit.release(outcome, permit.latency)


class AdaptiveLimiter:
    """One provider's concurrency limit and wait queue, for one worker.

    ``on_limit_change(new_limit)`` runs synchronously inside ``release`` whenever the
    integer limit changes (not for the initial value), so the caller can make the shared
    connector's per-host limit follow; it must be quick and must not raise.
    """

    def __init__(self, name: str, settings: LimitSettings,
                 clock: Callable[[], float] = time.monotonic,
                 on_limit_change: Callable[[int], None] | None = None):
        self.name = name
        self.settings = settings
        self._clock = clock
        self._on_limit_change = on_limit_change
        self._estimate = float(settings.initial)  # the controller's real-valued limit
        self._limit = settings.initial  # int(_estimate): what acquire() compares with
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._shed_full = self._shed_timeout = 0
        now = clock()
        self._interval_start, self._interval_sum, self._interval_count = now, 0.0, 0
        self._peak = 0  # most requests in flight during the current interval
        self._rtt = 0.0  # mean latency of the last completed interval
        self._window_start = now
        self._min_prev = self._min_cur = math.inf  # best interval mean, per window
        self._last_backoff = -math.inf
        self._hold = 0.0  # smoothed time a slot is held, for Retry-After

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def min_rtt(self) -> float:
        """Seconds; ``math.inf`` until the first interval closes."""
        return min(self._min_prev, self._min_cur)

    def __repr__(self) -> str:
        min_rtt = f"{self.min_rtt * 1000:.1f}" if self.min_rtt < math.inf else "n/a"
        return (f"<AdaptiveLimiter {self.name!r} limit={self._limit} "
                f"in_flight={self._in_flight} queued={len(self._waiters)} "
                f"min_rtt_ms={min_rtt}>")

    def snapshot(self) -> dict[str, float | int]:
        """For /health and metrics; latencies in ms, 0.0 while nothing was measured."""
        min_rtt = self.min_rtt if self.min_rtt < math.inf else 0.0
        return {
            "limit": self._limit, "in_flight": self._in_flight, "queued": len(self._waiters),
            "shed_total": self._shed_full + self._shed_timeout,
            "shed_queue_full": self._shed_full, "shed_queue_timeout": self._shed_timeout,
            "min_rtt_ms": round(min_rtt * 1000, 3), "rtt_ms": round(self._rtt * 1000, 3),
            "hold_ms": round(self._hold * 1000, 3),
        }

    def slot(self) -> _Slot:
        return _Slot(self)

    async def acquire(self) -> Permit:
        """A slot for one upstream request: at once below the limit when nobody waits
        (no barging past the queue), else after waiting in line. Raises ``Overloaded`` at
        once when the queue is full, or when no slot frees within ``queue_timeout``."""
        if self._in_flight < self._limit and not self._waiters:
            self._grant()
            return Permit(self, self._clock())
        if len(self._waiters) >= self.settings.queue_size:
            self._shed_full += 1
            raise self._overloaded(f"{len(self._waiters)} requests already wait for one "
                                   f"of its {self._limit} slots")
        if not await self._wait():
            self._shed_timeout += 1
            raise self._overloaded(
                f"none of its {self._limit} slots freed within {self.settings.queue_timeout:g} s")
        return Permit(self, self._clock())

    def _grant(self) -> None:
        self._in_flight += 1
        self._peak = max(self._peak, self._in_flight)

    async def _wait(self) -> bool:
        """Wait in line: True once ``_wake`` granted a slot (already counted in flight),
        False if the deadline passed first. A waiter cancelled meanwhile leaves the line,
        and gives back a slot granted in the same loop iteration, so nothing leaks."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_at(loop.time() + self.settings.queue_timeout, self._expire, fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                self._in_flight -= 1
                self._wake()
            else:
                with contextlib.suppress(ValueError):  # _wake may have dropped it
                    self._waiters.remove(fut)
            raise
        finally:
            timer.cancel()

    def _expire(self, fut: asyncio.Future[bool]) -> None:
        # Resolve instead of cancelling the task: a future settles once, so a grant and a
        # deadline in the same iteration cannot both happen.
        if not fut.done():
            self._waiters.remove(fut)
            fut.set_result(False)

    def _wake(self) -> None:
        """Hand free slots to the oldest waiters; skips one cancelled in this iteration."""
        waiters = self._waiters
        while waiters and self._in_flight < self._limit:
            fut = waiters.popleft()
            if not fut.done():
                self._grant()
                fut.set_result(True)

    def _overloaded(self, reason: str) -> Overloaded:
        """The 503 to raise. Retry-After estimates when this request would be admitted:
        the queue ahead of it plus itself, drained at ``limit`` slots each held for the
        smoothed hold time (``queue_timeout`` before anything was released)."""
        hold = self._hold or self.settings.queue_timeout
        drain = (len(self._waiters) + 1) * hold / self._limit
        retry_after = float(min(_MAX_RETRY_AFTER, max(1, math.ceil(drain))))
        return Overloaded(f"The gateway is shedding load for provider '{self.name}': "
                          f"{reason}; retry after {retry_after:g} s.", retry_after)

    def _release(self, outcome: Outcome, latency: float, held: float, now: float) -> None:
        self._in_flight -= 1
        self._hold = held if not self._hold else self._hold + _HOLD_WEIGHT * (held - self._hold)
        if outcome is Outcome.SUCCESS:
            self._interval_sum += latency
            self._interval_count += 1
            if now - self._interval_start >= self.settings.update_interval:
                self._update(now)
        elif outcome is not Outcome.IGNORE:
            self._back_off(now)
        if self._waiters:
            self._wake()

    def _update(self, now: float) -> None:
        """Close the interval: refresh the baseline, then step the limit by the gradient."""
        settings = self.settings
        rtt = self._rtt = self._interval_sum / self._interval_count
        if now - self._window_start >= settings.min_rtt_window:
            self._min_prev, self._min_cur, self._window_start = self._min_cur, math.inf, now
        self._min_cur = min(self._min_cur, rtt)
        peak, self._peak = self._peak, self._in_flight
        self._interval_start, self._interval_sum, self._interval_count = now, 0.0, 0
        if peak * 2 < self._limit:
            return  # app-limited: this interval says nothing about the limit
        # ``slack``: a worker whose own event loop is saturated delays every answer it
        # reads by a few ms (seen on this 2-core machine: 3 ms baseline, 5 ms under load,
        # an instant upstream). That is the gateway's lag, not upstream queueing, and must
        # not throttle a fast upstream; LLM latencies are far above it.
        allowed = settings.tolerance * self.min_rtt + settings.slack
        gradient = 1.0 if rtt <= allowed else max(0.5, allowed / rtt)
        target = self._estimate * gradient
        if peak >= self._limit:
            target += math.sqrt(self._estimate)
        self._set_estimate(self._estimate + settings.smoothing * (target - self._estimate))

    def _back_off(self, now: float) -> None:
        min_rtt = self.min_rtt if self.min_rtt < math.inf else 0.0
        if now - self._last_backoff < max(self.settings.update_interval, min_rtt):
            return  # already cut during this round trip
        self._last_backoff = now
        self._set_estimate(self._estimate * self.settings.backoff)

    def _set_estimate(self, value: float) -> None:
        settings = self.settings
        self._estimate = min(float(settings.max), max(float(settings.min), value))
        limit = int(self._estimate)
        if limit != self._limit:
            self._limit = limit
            if self._on_limit_change is not None:
                self._on_limit_change(limit)
