"""AdaptiveLimiter: the queue on the real event loop, the controller on a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from proxy.config.sections import LimitsConfig
from proxy.errors import InvalidRequest, Overloaded, UpstreamTimeout
from proxy.resilience.concurrency import AdaptiveLimiter, Outcome, Permit
from tests.polling import until


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: FakeClock | None = None, changes: list[int] | None = None,
            **settings: Any) -> AdaptiveLimiter:
    """``max`` defaults to ``initial``: the queue tests need a limit that cannot grow."""
    settings = {"initial": 1, "min": 1, **settings}
    settings.setdefault("max", settings["initial"])
    return AdaptiveLimiter("openai", LimitsConfig(**settings),
                           clock=clock or time.monotonic,
                           on_limit_change=None if changes is None else changes.append)


async def queued(lim: AdaptiveLimiter, waiters: int) -> None:
    """Until the tasks just created have run up to the limiter's queue (bounded): what the
    test does next needs them waiting there, not merely scheduled."""
    await until(lambda: lim.queued == waiters, what=lambda: f"{waiters} queued: {lim!r}")


async def run_round(lim: AdaptiveLimiter, clock: FakeClock, latency: float,
                    outcome: Outcome = Outcome.SUCCESS, concurrency: int | None = None) -> None:
    """``concurrency`` requests (default: the whole limit) held for ``latency`` seconds."""
    permits = [await lim.acquire() for _ in range(concurrency or lim.limit)]
    clock.now += latency
    for permit in permits:
        permit.release(outcome)


# --- the queue ---------------------------------------------------------------------------

async def test_under_limit_grants_at_once() -> None:
    lim = limiter(initial=2)
    first, second = await lim.acquire(), await lim.acquire()
    assert (lim.in_flight, lim.queued) == (2, 0)
    first.release(Outcome.SUCCESS)
    second.release(Outcome.SUCCESS)
    assert lim.in_flight == 0


async def test_at_limit_waiters_are_granted_in_fifo_order() -> None:
    lim = limiter()
    holder = await lim.acquire()
    order: list[int] = []

    async def wait(i: int) -> Permit:
        permit = await lim.acquire()
        order.append(i)
        return permit

    tasks = [asyncio.create_task(wait(i)) for i in range(3)]
    await queued(lim, 3)
    assert (lim.in_flight, lim.queued, order) == (1, 3, [])
    previous = holder
    for i, task in enumerate(tasks):
        previous.release(Outcome.SUCCESS)
        previous = await task
        assert order == list(range(i + 1))
        assert (lim.in_flight, lim.queued) == (1, 2 - i)
    previous.release(Outcome.SUCCESS)
    assert (lim.in_flight, lim.queued) == (0, 0)


async def test_a_newcomer_does_not_barge_past_the_queue() -> None:
    lim = limiter()
    holder = await lim.acquire()
    waiter = asyncio.create_task(lim.acquire())
    await queued(lim, 1)
    holder.release(Outcome.SUCCESS)  # the slot now belongs to the waiter
    newcomer = asyncio.create_task(lim.acquire())
    (await waiter).release(Outcome.SUCCESS)
    (await newcomer).release(Outcome.SUCCESS)
    assert (lim.in_flight, lim.queued) == (0, 0)


async def test_full_queue_sheds_at_once() -> None:
    lim = limiter(queue_size=1)
    holder = await lim.acquire()
    waiter = asyncio.create_task(lim.acquire())
    await queued(lim, 1)
    started = time.perf_counter()
    with pytest.raises(Overloaded) as caught:
        await lim.acquire()
    assert time.perf_counter() - started < 0.05
    error = caught.value
    assert (error.status, error.code, error.type) == (503, "gateway_overloaded", "server_error")
    assert error.retry_after >= 1 and error.retry_after == int(error.retry_after)
    assert "'openai'" in error.message
    assert error.headers() == {"Retry-After": str(int(error.retry_after))}
    assert lim.snapshot()["shed_queue_full"] == 1
    holder.release(Outcome.SUCCESS)
    (await waiter).release(Outcome.SUCCESS)


async def test_queue_deadline_sheds_after_queue_timeout() -> None:
    lim = limiter(queue_timeout=0.2)
    holder = await lim.acquire()
    started = time.perf_counter()
    with pytest.raises(Overloaded) as caught:
        await lim.acquire()
    assert 0.18 <= time.perf_counter() - started < 0.5
    assert caught.value.status == 503 and caught.value.retry_after > 0
    assert (lim.in_flight, lim.queued, lim.snapshot()["shed_total"]) == (1, 0, 1)
    holder.release(Outcome.SUCCESS)
    assert lim.in_flight == 0


async def test_retry_after_follows_the_observed_hold_time() -> None:
    clock = FakeClock()
    lim = limiter(clock, queue_size=1)
    permit = await lim.acquire()
    clock.now += 5.0
    permit.release(Outcome.IGNORE)  # slots are held about 5 s
    holder = await lim.acquire()
    waiter = asyncio.create_task(lim.acquire())
    await queued(lim, 1)
    with pytest.raises(Overloaded) as caught:
        await lim.acquire()
    assert caught.value.retry_after == 10.0  # two requests ahead of a retry, 5 s each
    holder.release(Outcome.IGNORE)
    (await waiter).release(Outcome.IGNORE)


async def test_cancelled_waiter_leaves_no_leak() -> None:
    lim = limiter()
    holder = await lim.acquire()
    cancelled = asyncio.create_task(lim.acquire())
    patient = asyncio.create_task(lim.acquire())
    await queued(lim, 2)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert (lim.in_flight, lim.queued) == (1, 1)
    holder.release(Outcome.SUCCESS)
    (await patient).release(Outcome.SUCCESS)
    assert (lim.in_flight, lim.queued) == (0, 0)


async def test_waiter_cancelled_right_after_its_grant_passes_the_slot_on() -> None:
    lim = limiter()
    holder = await lim.acquire()
    first = asyncio.create_task(lim.acquire())
    second = asyncio.create_task(lim.acquire())
    await queued(lim, 2)
    holder.release(Outcome.SUCCESS)  # grants ``first``, which has not run yet
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    permit = await asyncio.wait_for(second, 1)
    assert (lim.in_flight, lim.queued) == (1, 0)
    permit.release(Outcome.SUCCESS)
    assert lim.in_flight == 0


async def test_release_is_idempotent() -> None:
    lim = limiter()
    permit = await lim.acquire()
    waiter = asyncio.create_task(lim.acquire())
    await queued(lim, 1)
    permit.release(Outcome.SUCCESS)
    permit.release(Outcome.SUCCESS)  # must not free the waiter's slot a second time
    assert (lim.in_flight, lim.queued) == (1, 0)
    (await waiter).release(Outcome.SUCCESS)
    assert lim.in_flight == 0


# --- slot() and outcomes ------------------------------------------------------------------

@pytest.mark.parametrize(("raised", "outcome", "cut"), [
    (None, None, False),
    (UpstreamTimeout("slow"), None, True),
    (InvalidRequest("bug"), None, False),
    (asyncio.CancelledError(), None, False),
    (None, Outcome.OVERLOAD, True),
    (UpstreamTimeout("cut off mid-stream"), Outcome.SUCCESS, False),
])
async def test_slot_judges_the_outcome(raised: BaseException | None, outcome: Outcome | None,
                                       cut: bool) -> None:
    lim = limiter(FakeClock(), initial=10)
    expect = pytest.raises(type(raised)) if raised else contextlib.nullcontext()
    with expect:
        async with lim.slot() as permit:
            permit.outcome = outcome
            if raised is not None:
                raise raised
    assert lim.in_flight == 0
    assert lim.limit == (1 if cut else 10)  # a cut keeps 0.9 x the one in flight: min


async def test_answered_fixes_the_outcome_at_headers() -> None:
    clock = FakeClock()
    lim = limiter(clock, initial=10)
    async with lim.slot() as permit:
        clock.now += 0.25
        permit.answered(503)
        clock.now += 30.0  # the rest of a long stream
    assert permit.outcome is Outcome.OVERLOAD
    assert lim.limit == 1


# --- the controller (issue 9: AIMD on overload evidence only) ------------------------------

async def test_overloads_lower_the_limit_down_to_min() -> None:
    clock, changes = FakeClock(), list[int]()
    lim = limiter(clock, changes, initial=64, min=4)
    limits = []
    for _ in range(40):
        await run_round(lim, clock, 0.2, Outcome.OVERLOAD, concurrency=1)
        limits.append(lim.limit)
    # The first cut keeps 0.9 x what was in flight (1), not 0.9 x the limit: min at once.
    assert limits == [4] * 40
    assert changes == [4]


async def test_the_first_cut_follows_what_was_in_flight() -> None:
    clock = FakeClock()
    lim = limiter(clock, initial=1024, max=1024)
    permits = [await lim.acquire() for _ in range(40)]
    permits[0].release(Outcome.OVERLOAD)
    assert lim.limit == 36  # 0.9 x 40, at once, not 0.9 x 1024
    for permit in permits[1:]:  # admitted before the cut: the same round trip
        permit.release(Outcome.ERROR)
    assert lim.limit == 36 and lim.snapshot()["cuts"] == 1


async def test_a_burst_of_failures_cuts_once_per_round_trip() -> None:
    clock = FakeClock()
    lim = limiter(clock, initial=64)
    await run_round(lim, clock, 0.05, Outcome.ERROR, concurrency=20)
    assert lim.limit == 18
    await run_round(lim, clock, 0.05, Outcome.ERROR, concurrency=18)  # admitted after it
    assert lim.limit == 16


async def test_successes_at_saturation_raise_the_limit_up_to_max() -> None:
    """+1/limit for each success released while every slot was taken: about one slot per
    round trip at the limit (TCP's congestion avoidance)."""
    clock, changes = FakeClock(), list[int]()
    lim = limiter(clock, changes, initial=10, max=20)
    rounds = 0
    while lim.limit < 20:
        assert rounds < 400, lim
        await run_round(lim, clock, 0.1)  # one release per round finds every slot taken
        rounds += 1
    assert 100 <= rounds <= 300, rounds
    assert changes == list(range(11, 21))


async def test_successes_below_the_limit_keep_it() -> None:
    clock = FakeClock()
    lim = limiter(clock, initial=10, max=64)
    for _ in range(10):
        await run_round(lim, clock, 0.1, concurrency=9)
    assert lim.limit == 10


@pytest.mark.parametrize("latency", [0.01, 1.0, 30.0, 300.0])
async def test_latency_never_shrinks_the_limit(latency: float) -> None:
    """Short answers, then a burst of long ones at every slot: the limit must not move
    down (issue 9: 300 x 1 s requests got 184 503s under the latency gradient)."""
    clock = FakeClock()
    lim = limiter(clock, initial=64, max=64)
    for _ in range(20):
        await run_round(lim, clock, 0.01)
    for _ in range(5):
        await run_round(lim, clock, latency)
    assert lim.limit == 64


async def test_defaults_start_at_max() -> None:
    lim = AdaptiveLimiter("openai", LimitsConfig())
    assert lim.limit == 1024 == LimitsConfig().max
    permits = [await lim.acquire() for _ in range(1000)]
    assert (lim.in_flight, lim.queued) == (1000, 0)
    for permit in permits:
        permit.release(Outcome.SUCCESS)
    assert lim.limit == 1024


async def test_queued_requests_raise_the_limit_with_each_success() -> None:
    lim = limiter(FakeClock(), initial=4, max=10, backoff=0.5)
    first = [await lim.acquire() for _ in range(4)]
    first[0].release(Outcome.OVERLOAD)  # fresh evidence: the limit holds, at 0.5 x 4
    for permit in first[1:]:  # admitted before the cut: they say nothing
        permit.release(Outcome.SUCCESS)
    assert lim.limit == 2
    holders = [await lim.acquire(), await lim.acquire()]
    waiters = [asyncio.create_task(lim.acquire()) for _ in range(4)]
    await queued(lim, 4)
    for holder in holders:
        holder.release(Outcome.SUCCESS)
    assert lim.limit == 2  # +1/2, then +1/2.5: not yet a whole slot
    for waiter in waiters:
        (await waiter).release(Outcome.SUCCESS)
    assert lim.limit == 3 and (lim.in_flight, lim.queued) == (0, 0)


async def test_a_client_leaving_says_nothing() -> None:
    clock = FakeClock()
    lim = limiter(clock, initial=10, max=64)
    await run_round(lim, clock, 0.1, Outcome.IGNORE)
    assert lim.limit == 10


def test_repr_shows_the_state() -> None:
    lim = limiter(initial=64)
    assert repr(lim) == "<AdaptiveLimiter 'openai' limit=64 in_flight=0 queued=0 cuts=0>"


async def test_repr_counts_in_flight() -> None:
    lim = limiter(initial=4)
    permit = await lim.acquire()
    assert "limit=4 in_flight=1 queued=0" in repr(lim)
    permit.release(Outcome.IGNORE)


# --- evidence is forgotten ---------------------------------------------------------------

async def test_a_lowered_limit_is_forgotten_without_fresh_evidence() -> None:
    """One 503 at low concurrency cuts the limit to ``min``; long after it, with no
    overload since, a burst is not held to that old figure: it is admitted at once."""
    clock = FakeClock()
    lim = AdaptiveLimiter("openai", LimitsConfig(), clock=clock)
    (await lim.acquire()).release(Outcome.OVERLOAD)
    assert lim.limit == 4
    clock.now += 5.0  # fresh: the lowered limit holds
    held = [await lim.acquire() for _ in range(4)]
    with pytest.raises(Overloaded):
        await asyncio.wait_for(lim.acquire(), 5)  # (queue_timeout 2 s of real time)
    clock.now += 5.0  # forget_after (10 s) since the evidence
    burst = [await asyncio.wait_for(lim.acquire(), 0.1) for _ in range(100)]
    assert lim.in_flight == 104 and lim.limit >= 104
    for permit in held + burst:
        permit.release(Outcome.SUCCESS)
    assert lim.snapshot()["shed_total"] == 1


async def test_a_waiter_whose_evidence_went_stale_is_admitted_not_shed() -> None:
    lim = AdaptiveLimiter("openai", LimitsConfig(min=1, queue_timeout=0.3,
                                                  forget_after=0.1))
    holder = await lim.acquire()
    (await lim.acquire()).release(Outcome.OVERLOAD)  # limit -> 1, holder still in flight
    assert lim.limit == 1
    started = time.perf_counter()
    waiter = await asyncio.wait_for(lim.acquire(), 1)
    assert 0.25 <= time.perf_counter() - started < 0.6
    assert lim.snapshot()["shed_total"] == 0 and lim.in_flight == 2
    holder.release(Outcome.SUCCESS)
    waiter.release(Outcome.SUCCESS)


async def test_evidence_that_keeps_coming_keeps_the_limit() -> None:
    clock = FakeClock()
    lim = AdaptiveLimiter("openai", LimitsConfig(queue_size=0), clock=clock)
    for _ in range(5):  # an overload every 5 s: never forget_after (10 s) without one
        (await lim.acquire()).release(Outcome.OVERLOAD)
        clock.now += 5.0
    held = [await lim.acquire() for _ in range(lim.limit)]
    assert len(held) == 4
    with pytest.raises(Overloaded):
        await lim.acquire()
    for permit in held:
        permit.release(Outcome.SUCCESS)
