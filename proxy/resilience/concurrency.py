"""Per-provider adaptive concurrency limits, with a bounded queue that sheds load early.

Issue 9 ("Adaptive concurrency: never shed a healthy upstream"): the limit moves only on
evidence that the upstream is overloaded, never on latency. LLM latency varies 1000x with
the answer's length, so a latency gradient read a burst of long generations as congestion
and shed a healthy upstream (300 concurrent 1 s requests: 184 got 503).

The controller is TCP's AIMD (RFC 5681), as Netflix concurrency-limits' ``AIMDLimit``:

* **Decrease** on an ``OVERLOAD`` (429/503) or ``ERROR`` (connection error, connect or
  headers timeout): the limit becomes ``backoff`` x the requests in flight (at most the
  limit), as TCP's ssthresh follows FlightSize, so the first cut takes effect at once
  even from a limit far above the load. At most once per round trip: a failure counts
  only if its request was admitted after the last cut (TCP NewReno's recovery point), so
  a burst of failures admitted under the old limit cuts once.
* **Increase** by 1/limit for each success admitted after the last cut and released
  while every slot was taken or requests waited (the limit was the bottleneck), up to
  ``max``: about one slot per round trip at the limit, TCP's congestion avoidance (+1
  per success, as AIMDLimit, let ``bench/overload.py``'s upstream reject 12x more).
  Successes below the limit leave it alone.

The limit starts at ``initial`` (default: ``max``), so a burst against an upstream that
does not push back passes untouched; the queue only matters once the limit was lowered.
A lowered limit is **forgotten** after ``forget_after`` seconds without a new overload or
error: demand then raises it at once (``_forget``), so one 503 at a quiet moment, which
cuts to ``min``, cannot shed a later burst; an upstream that keeps pushing back keeps
its evidence fresh, and its limit.
State is per worker. The controller reads the injectable ``clock`` (for the hold time
behind Retry-After); queue deadlines run on the event loop's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType

from proxy.config.sections import LimitsConfig
from proxy.errors import Overloaded, UpstreamError

# The OpenAI SDKs honour a Retry-After of up to 60 s (newer ones 120 s); past that they
# would use their own backoff, so a larger figure would only be ignored.
_MAX_RETRY_AFTER = 60
_HOLD_WEIGHT = 0.1  # EWMA weight of one release in the hold time behind Retry-After


class Outcome(enum.Enum):
    """What one upstream request says about the upstream's capacity."""

    SUCCESS = "success"    # it answered: may raise a saturated limit
    OVERLOAD = "overload"  # it answered 429 or 503: multiplicative decrease
    ERROR = "error"        # connection error or connect/headers timeout: decrease
    IGNORE = "ignore"      # the client went away: the slot frees, nothing is learnt


def outcome_for_status(status: int) -> Outcome:
    return Outcome.OVERLOAD if status in (429, 503) else Outcome.SUCCESS


def outcome_for_exception(exc: BaseException) -> Outcome:
    """Translated upstream failures (``UpstreamClient.open`` raises ``UpstreamError``) and
    timeouts count against the upstream; cancellation, the client's connection dropping
    or a gateway bug say nothing about it, so they must not shrink its limit."""
    return Outcome.ERROR if isinstance(exc, (UpstreamError, TimeoutError)) else Outcome.IGNORE


class Permit:
    """One granted slot. ``release`` frees it exactly once; a second call is a no-op so
    cleanup paths need not track whether someone released already. ``serial`` orders
    grants, so the controller knows whether it was admitted after the last cut."""

    __slots__ = ("_limiter", "_released", "_start", "outcome", "serial")

    def __init__(self, limiter: AdaptiveLimiter, start: float, serial: int):
        self._limiter = limiter
        self._start = start
        self._released = False
        self.serial = serial
        self.outcome: Outcome | None = None  # read by ``slot()`` on exit

    def answered(self, status: int) -> None:
        """Call when the upstream's status arrives: the outcome follows the status."""
        self.outcome = outcome_for_status(status)

    def release(self, outcome: Outcome) -> None:
        if self._released:
            return
        self._released = True
        now = self._limiter._clock()
        self._limiter._release(outcome, self.serial, now - self._start)


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
        permit.release(outcome)


class AdaptiveLimiter:
    """One provider's concurrency limit and wait queue, for one worker.

    ``on_limit_change(new_limit)`` runs synchronously inside ``release`` whenever the
    integer limit changes (not for the initial value), so the caller can make the shared
    connector's per-host limit follow; it must be quick and must not raise.
    """

    def __init__(self, name: str, settings: LimitsConfig,
                 clock: Callable[[], float] = time.monotonic,
                 on_limit_change: Callable[[int], None] | None = None):
        self.name = name
        self.settings = settings
        self._clock = clock
        self._on_limit_change = on_limit_change
        self._estimate = float(settings.start)  # the controller's real-valued limit
        self._limit = settings.start  # int(_estimate): what acquire() compares with
        self._in_flight = 0
        self._waiters: deque[asyncio.Future[int]] = deque()
        self._shed_full = self._shed_timeout = 0
        self._granted = 0  # serial of the last grant
        self._cut_at = 0  # serial of the last grant before the last cut
        self._cuts = 0
        self._evidence_at = -math.inf  # the last overload or error seen (``_clock``)
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

    def __repr__(self) -> str:
        return (f"<AdaptiveLimiter {self.name!r} limit={self._limit} "
                f"in_flight={self._in_flight} queued={len(self._waiters)} cuts={self._cuts}>")

    def snapshot(self) -> dict[str, float | int]:
        """For /health and metrics."""
        return {
            "limit": self._limit, "in_flight": self._in_flight, "queued": len(self._waiters),
            "shed_total": self._shed_full + self._shed_timeout,
            "shed_queue_full": self._shed_full, "shed_queue_timeout": self._shed_timeout,
            "cuts": self._cuts, "hold_ms": round(self._hold * 1000, 3),
        }

    def slot(self) -> _Slot:
        return _Slot(self)

    async def acquire(self) -> Permit:
        """A slot for one upstream request: at once below the limit when nobody waits
        (no barging past the queue), else after waiting in line. Raises ``Overloaded`` at
        once when the queue is full, or when no slot frees within ``queue_timeout``."""
        if self._in_flight >= self._limit and self._stale():
            self._forget()  # no fresh evidence: the limit is not the upstream's any more
        if self._in_flight < self._limit and not self._waiters:
            self._grant()
            return Permit(self, self._clock(), self._granted)
        if len(self._waiters) >= self.settings.queue_size:
            self._shed_full += 1
            raise self._overloaded(f"{len(self._waiters)} requests already wait for one "
                                   f"of its {self._limit} slots")
        serial = await self._wait()
        if not serial:
            self._shed_timeout += 1
            raise self._overloaded(
                f"none of its {self._limit} slots freed within {self.settings.queue_timeout:g} s")
        return Permit(self, self._clock(), serial)

    def _grant(self) -> None:
        self._in_flight += 1
        self._granted += 1

    async def _wait(self) -> int:
        """Wait in line: the grant's serial once ``_wake`` granted a slot (already counted
        in flight), 0 if the deadline passed first. A waiter cancelled meanwhile leaves the line,
        and gives back a slot granted in the same loop iteration, so nothing leaks."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
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

    def _expire(self, fut: asyncio.Future[int]) -> None:
        # Resolve instead of cancelling the task: a future settles once, so a grant and a
        # deadline in the same iteration cannot both happen.
        if not fut.done():
            self._waiters.remove(fut)
            if self._stale():  # the evidence that queued it is old: admit, not shed
                self._forget()  # (unless the limit is at ``max``: the operator's cap)
            if self._in_flight < self._limit:
                self._grant()
                fut.set_result(self._granted)
            else:
                fut.set_result(0)

    def _stale(self) -> bool:
        """Whether the upstream has not pushed back for ``forget_after`` seconds."""
        return self._clock() - self._evidence_at >= self.settings.forget_after

    def _forget(self) -> None:
        """Raise a limit that holds on old evidence to what is asked of it now: one 503
        long ago must not shed today's burst (issue 9, first do no harm)."""
        asked = self._in_flight + len(self._waiters) + 1
        if asked > self._estimate:
            self._set_estimate(float(asked))
            self._wake()

    def _wake(self) -> None:
        """Hand free slots to the oldest waiters; skips one cancelled in this iteration."""
        waiters = self._waiters
        while waiters and self._in_flight < self._limit:
            fut = waiters.popleft()
            if not fut.done():
                self._grant()
                fut.set_result(self._granted)

    def _overloaded(self, reason: str) -> Overloaded:
        """The 503 to raise. Retry-After estimates when this request would be admitted:
        the queue ahead of it plus itself, drained at ``limit`` slots each held for the
        smoothed hold time (``queue_timeout`` before anything was released)."""
        hold = self._hold or self.settings.queue_timeout
        drain = (len(self._waiters) + 1) * hold / self._limit
        retry_after = float(min(_MAX_RETRY_AFTER, max(1, math.ceil(drain))))
        return Overloaded(f"The gateway is shedding load for provider '{self.name}': "
                          f"{reason}; retry after {retry_after:g} s.", retry_after)

    def _release(self, outcome: Outcome, serial: int, held: float) -> None:
        saturated = self._in_flight >= self._limit or bool(self._waiters)
        self._in_flight -= 1
        self._hold = held if not self._hold else self._hold + _HOLD_WEIGHT * (held - self._hold)
        if serial > self._cut_at:  # admitted under the current limit: it is evidence
            if outcome is Outcome.SUCCESS:
                if saturated:
                    self._set_estimate(self._estimate + 1 / self._estimate)
            elif outcome is not Outcome.IGNORE:
                self._back_off()
        if outcome is Outcome.OVERLOAD or outcome is Outcome.ERROR:
            self._evidence_at = self._clock()  # fresh, even within a round trip
        if self._waiters:
            self._wake()

    def _back_off(self) -> None:
        """Multiplicative decrease from what was really in flight (RFC 5681's FlightSize),
        counting the request that failed; later failures of requests admitted before
        now are the same round trip and are ignored (``_cut_at``)."""
        self._cut_at = self._granted
        self._cuts += 1
        flight = min(self._estimate, float(self._in_flight + 1))
        self._set_estimate(flight * self.settings.backoff)

    def _set_estimate(self, value: float) -> None:
        settings = self.settings
        self._estimate = min(float(settings.max), max(float(settings.min), value))
        limit = int(self._estimate)
        if limit != self._limit:
            self._limit = limit
            if self._on_limit_change is not None:
                self._on_limit_change(limit)
