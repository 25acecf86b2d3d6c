"""A circuit breaker per provider (issue #4): stop sending requests to an upstream that
keeps failing, and let one probe through after a cooldown.

States: *closed* (requests flow; ``failures`` consecutive failures open it), *open*
(requests fail at once with 503 ``circuit_open`` and a ``Retry-After`` of the cooldown
left, so a dead upstream costs clients milliseconds rather than connect timeouts), and
*half-open* (after ``cooldown`` seconds one request probes the upstream: its success
closes the breaker, its failure opens it again). A failure is a connection error, a
timeout or a 5xx answer; 429 is the upstream pacing us (``limits.py`` handles it), not a
fault. State is per worker.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy import validate as v
from proxy.errors import GatewayError

FAILURE_STATUSES = frozenset({500, 502, 503, 504})


@dataclass(frozen=True)
class BreakerSettings:
    failures: int = 5  # consecutive failures that open it; 0: never opens
    cooldown: float = 10.0  # seconds open before one probe is let through


def parse_breaker(raw: Any, problems: list[str]) -> BreakerSettings:
    return v.section(raw, "breaker", BreakerSettings, problems, {
        "failures": v.non_negative_int, "cooldown": v.positive_number})


class CircuitOpen(GatewayError):
    """503 without an upstream call; SDKs retry it as a server error after Retry-After."""

    status = 503
    code = "circuit_open"

    def __init__(self, provider: str, retry_after: float):
        super().__init__(f"Provider '{provider}' is failing; the gateway stopped sending it "
                         f"requests for a while. Retry after {math.ceil(retry_after)} s.")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class CircuitBreaker:
    def __init__(self, name: str, settings: BreakerSettings,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.settings = settings
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self.opened = 0  # times it opened, for /health

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.state} failures={self._failures}>"

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._clock() >= self._opened_at + self.settings.cooldown \
            else "open"

    @property
    def available(self) -> bool:
        """Whether a request may go now (closed, or half-open with no probe out): routing
        prefers available deployments over ones that would fail at once."""
        if self._opened_at is None:
            return True
        return not self._probing and self._clock() >= self._opened_at + self.settings.cooldown

    def check(self) -> bool:
        """Before a request: raises ``CircuitOpen`` unless it may go; True when it is
        the half-open probe (its outcome decides)."""
        if self._opened_at is None:
            return False
        left = self._opened_at + self.settings.cooldown - self._clock()
        if left > 0 or self._probing:
            raise CircuitOpen(self.name, max(left, self.settings.cooldown / 10))
        self._probing = True
        return True

    def record(self, *, failed: bool | None, probe: bool = False) -> None:
        """After a request: ``failed`` None when it says nothing (the client left);
        ``probe`` when ``check`` made it the half-open probe."""
        if probe:
            self._probing = False
        if failed is None:
            return
        if not failed:
            if self._opened_at is not None and not probe:
                return  # begun before the circuit opened (a long stream): not news
            self._failures, self._opened_at = 0, None
            return
        self._failures += 1
        if self._opened_at is not None or (
                self.settings.failures and self._failures >= self.settings.failures):
            if self._opened_at is None or self.state == "half_open":
                self.opened += 1
            self._opened_at = self._clock()

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "consecutive_failures": self._failures,
                "opened_total": self.opened}
