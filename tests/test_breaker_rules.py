"""The circuit breaker's rules with an injected clock (issue #9): a failure ratio over a
sliding window, only with ``min_requests`` judged calls and failures from
``min_callers`` distinct callers; one half-open probe; panic instead of 503 unless
``fail_fast``; which errors are faults; the ``breaker`` config section."""

from __future__ import annotations

import pytest

from proxy.config.breaker import BreakerSettings
from proxy.config.loader import ConfigError, config_from_dict
from proxy.errors import (
    CircuitOpen,
    ConnectTimeout,
    FirstTokenTimeout,
    HeadersTimeout,
    PoolTimeout,
    RequestTimeout,
    StreamStalled,
    UpstreamProtocolError,
    UpstreamUnreachable,
)
from proxy.providers import PROVIDER_TYPES
from proxy.resilience.breaker import CircuitBreaker, Pass, fault


def breaker(clock: list[float], **settings: float | bool) -> CircuitBreaker:
    return CircuitBreaker("up", BreakerSettings(**settings),  # type: ignore[arg-type]
                          clock=lambda: clock[0])


def feed(cb: CircuitBreaker, *, failures: int, successes: int = 0,
         callers: tuple[str, ...] = ("a", "b")) -> None:
    for n in range(successes):
        cb.record(failed=False, caller=callers[n % len(callers)])
    for n in range(failures):
        cb.record(failed=True, caller=callers[n % len(callers)])


def test_it_opens_on_the_ratio_once_min_requests_were_judged() -> None:
    now = [0.0]
    cb = breaker(now, min_requests=10, failure_ratio=0.5)
    feed(cb, failures=4, successes=5)
    assert cb.state == "closed"  # 9 calls: too few to judge
    feed(cb, failures=1)  # 5 of 10 failed
    assert cb.state == "open"
    assert cb.snapshot()["window"] == {"seconds": 30.0, "calls": 10, "failures": 5,
                                       "failing_callers": 2}


def test_a_low_ratio_never_opens_it() -> None:
    cb = breaker([0.0], min_requests=10, failure_ratio=0.5)
    for _ in range(50):
        feed(cb, failures=2, successes=3)  # 40 % failing, 250 calls
    assert cb.state == "closed"


def test_failures_from_one_caller_never_open_it() -> None:
    cb = breaker([0.0], min_requests=10)
    feed(cb, failures=100, callers=("tenant-with-bad-requests",))
    assert cb.state == "closed"
    assert cb.snapshot()["window"]["failing_callers"] == 1
    feed(cb, failures=1, callers=("someone-else",))
    assert cb.state == "open"


def test_old_calls_slide_out_of_the_window() -> None:
    now = [0.0]
    cb = breaker(now, window=10, min_requests=10)
    feed(cb, failures=9)
    now[0] = 10.5  # every bucket of those nine has passed
    feed(cb, failures=1)
    assert cb.state == "closed"
    assert cb.snapshot()["window"]["calls"] == 1
    now[0] = 15.0
    feed(cb, failures=9)
    assert cb.state == "open"  # ten within the last 10 s


def test_the_half_open_probe_is_alone_and_decides() -> None:
    now = [0.0]
    cb = breaker(now, min_requests=1, min_callers=1, cooldown=1, fail_fast=True)
    assert cb.check() is Pass.CLOSED
    cb.record(failed=True)
    with pytest.raises(CircuitOpen):
        cb.check()
    now[0] = 1.0
    assert cb.state == "half_open"
    assert cb.check() is Pass.PROBE
    with pytest.raises(CircuitOpen):
        cb.check()  # no second request while it runs
    cb.record(failed=None, how=Pass.PROBE)  # its client left: the next may probe
    assert cb.check() is Pass.PROBE
    cb.record(failed=True, how=Pass.PROBE)
    assert (cb.state, cb.opened) == ("open", 2)
    now[0] = 2.0
    assert cb.check() is Pass.PROBE
    cb.record(failed=False)  # a straggler begun before it opened: not news
    assert cb.state == "half_open" and not cb.available
    cb.record(failed=False, how=Pass.PROBE)
    assert cb.state == "closed"
    assert cb.snapshot()["window"]["calls"] == 0  # a closed breaker starts afresh


def test_an_open_breaker_lets_requests_through_and_a_success_closes_it() -> None:
    now = [0.0]
    cb = breaker(now, min_requests=2, min_callers=1, cooldown=10)
    feed(cb, failures=2)
    assert cb.state == "open" and not cb.available
    assert cb.check() is Pass.PANIC  # no CircuitOpen: the request is sent anyway
    cb.record(failed=True, how=Pass.PANIC)
    assert cb.check() is Pass.PANIC
    cb.record(failed=False, how=Pass.PANIC)  # evidence of recovery
    assert cb.state == "closed"
    assert (cb.snapshot()["opened_total"], cb.snapshot()["panic_total"]) == (1, 2)


def test_a_disabled_breaker_never_opens() -> None:
    cb = breaker([0.0], enabled=False, min_requests=1, min_callers=1)
    for _ in range(100):
        assert cb.check() is Pass.CLOSED
        cb.record(failed=True, caller="x")
    assert cb.state == "closed"


@pytest.mark.parametrize(("error", "counts"), [
    (UpstreamUnreachable("refused"), True),
    (UpstreamProtocolError("cut"), True),
    (ConnectTimeout("up", 1), True),
    (HeadersTimeout("up", 1), True),
    (PoolTimeout("up", 1), None),  # this worker's pool, not the upstream
    (FirstTokenTimeout("up", 1), None),  # a long generation
    (StreamStalled("up", 1), None),
    (RequestTimeout("up", 1), None),
    (ValueError("not the upstream"), None),
])
def test_which_errors_are_upstream_faults(error: Exception, counts: bool | None) -> None:
    assert fault(error) is counts


def test_a_non_stream_headers_deadline_is_one_long_answer_not_a_fault() -> None:
    """A non-stream answer's headers come once it is generated (review of issue 9)."""
    assert fault(HeadersTimeout("up", 1), stream=False) is None
    assert fault(ConnectTimeout("up", 1), stream=False) is True


def parse(breaker: object) -> BreakerSettings:
    return config_from_dict({"breaker": breaker}, {}, PROVIDER_TYPES.keys()).breaker


def test_the_breaker_section() -> None:
    assert parse(None) == BreakerSettings(enabled=True, window=30, min_requests=10,
                                          min_callers=2, failure_ratio=0.5, cooldown=10,
                                          fail_fast=False)
    assert parse({"failures": 0}).enabled is False  # issue #4's "off" still works
    assert parse({"min_callers": 1, "fail_fast": True}) == BreakerSettings(
        min_callers=1, fail_fast=True)
    with pytest.raises(ConfigError) as caught:
        parse({"failures": 5, "failure_ratio": 1.5, "min_requests": 0})
    assert caught.value.problems == [
        "breaker.failures: no longer supported (the breaker does not count failures in "
        "a row); use breaker.failure_ratio, breaker.min_requests, breaker.min_callers "
        "and breaker.window, or breaker.enabled: false",
        "breaker.min_requests: must be greater than 0 (got 0)",
        "breaker.failure_ratio: must be between 0 and 1, exclusive (got 1.5)",
    ]


def test_connection_failures_from_one_caller_open_it() -> None:
    """One application on one key, or every client behind one nginx: a host that
    refuses connections must still be steered around (review of issue 9). Error
    answers (502/503/504), which a request's content can cause, still need two callers."""
    cb = breaker([0.0], min_requests=10)
    for _ in range(20):
        cb.record(failed=True, caller="the-only-app", connection=False)
    assert cb.state == "closed"
    for _ in range(20):
        cb.record(failed=True, caller="the-only-app", connection=True)
    assert cb.state == "open"


def test_a_probe_left_over_from_before_does_not_block_the_next_one() -> None:
    """A panic success closes the circuit while a probe is still out; the circuit opens
    again; after the new cooldown a new probe must go, not wait for the old one."""
    now = [0.0]
    cb = breaker(now, min_requests=2, min_callers=1, cooldown=10)
    feed(cb, failures=2)
    assert cb.state == "open"
    now[0] = 11.0
    assert cb.check() is Pass.PROBE  # out, and slow
    assert cb.check() is Pass.PANIC
    cb.record(failed=False, how=Pass.PANIC)  # it recovered: closed
    assert cb.state == "closed"
    feed(cb, failures=2)  # (window emptied on close) open again
    assert cb.state == "open"
    now[0] = 22.0
    assert cb.available
    assert cb.check() is Pass.PROBE
