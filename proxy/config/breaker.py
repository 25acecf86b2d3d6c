"""The ``breaker`` section (issues #4, #9): when a provider's circuit breaker opens
(``resilience/breaker.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config import validate as v


@dataclass(frozen=True)
class BreakerSettings:
    enabled: bool = True
    window: float = 30.0  # seconds of calls the ratio is taken over
    min_requests: int = 10  # judged calls in the window before it may open
    min_callers: int = 2  # distinct callers among the window's failures
    failure_ratio: float = 0.5  # failed / judged calls that opens it
    cooldown: float = 10.0  # seconds open before one probe is let through
    fail_fast: bool = False  # every candidate open: 503 circuit_open, not sent anyway


def parse_breaker(raw: Any, problems: list[str]) -> BreakerSettings:
    if isinstance(raw, dict) and "failures" in raw:  # issue #4's key, consecutive failures
        raw = dict(raw)
        if raw.pop("failures") == 0 and "enabled" not in raw:
            raw["enabled"] = False  # still means off
        else:
            problems.append(
                "breaker.failures: no longer supported (the breaker does not count "
                "failures in a row); use breaker.failure_ratio, breaker.min_requests, "
                "breaker.min_callers and breaker.window, or breaker.enabled: false")
    return v.section(raw, "breaker", BreakerSettings, problems, {
        "enabled": v.boolean, "window": v.positive_number,
        "min_requests": v.positive_int, "min_callers": v.positive_int,
        "failure_ratio": v.fraction, "cooldown": v.positive_number,
        "fail_fast": v.boolean})
