"""When an upstream call is tried again, and after how long (issue #4).

Retried, while nothing has been sent to the client yet (``resilience/attempt.py``): a
connection that failed or closed without an answer (``UpstreamUnreachable``: refused,
reset, a kept-alive connection the upstream had dropped), the ``connect`` and
``headers`` deadlines (``errors.RETRYABLE_ERRORS``: no answer began), and the statuses
429, 500, 502, 503 and 504. Not retried: the deadlines of a body (first token, stall,
total: an answer had begun), the gateway's own 503 (load shed), any other status.

The delay is exponential backoff with full jitter (a uniform draw in [0, min(max_delay,
base_delay * 2^n)]), or the upstream's ``Retry-After`` when it sends one. A
``Retry-After`` longer than ``max_retry_after`` is not waited for: the answer goes to the
client as it is, with its header. A retry budget per provider (retries at most
``budget`` x the requests of the last 10 s, and always 3) keeps a failing upstream
from receiving a storm of retries on top of its load.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections import deque
from collections.abc import Callable, Mapping

from proxy.config.sections import RetryConfig

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
BUDGET_WINDOW = 10.0
MIN_RETRIES = 3  # per window, whatever the traffic: a quiet gateway still retries


class RetryPolicy:
    """One provider's retry decisions and budget (per worker)."""

    def __init__(self, config: RetryConfig, clock: Callable[[], float] = time.monotonic,
                 draw: Callable[[], float] = random.random):
        self.config = config
        self._clock = clock
        self._draw = draw
        # Per whole second of the window: [second, requests, retries]. Counts, not one
        # timestamp per request: a busy provider's window stays 11 small entries (the
        # window's edge moves by whole seconds, which a budget does not mind).
        self._window: deque[list[int]] = deque()

    def __repr__(self) -> str:
        requests, retries = self._totals()
        return (f"<RetryPolicy max_attempts={self.config.max_attempts} "
                f"requests={requests} retries={retries}>")

    def record_request(self) -> None:
        """A client request begins (its retries will be counted against the budget)."""
        self._second()[1] += 1

    def after_error(self, attempt: int) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` after a connection failure;
        None: do not retry."""
        if not self._may_retry(attempt):
            return None
        return self._spend(self._backoff(attempt))

    def after_status(self, attempt: int, status: int, headers: Mapping[str, str]
                     ) -> float | None:
        """The same after an answer with ``status``; None: relay that answer."""
        if status not in RETRY_STATUSES or not self._may_retry(attempt):
            return None
        wait = retry_after(headers.get("Retry-After"))
        if wait is None:
            wait = self._backoff(attempt)
        elif wait > self.config.max_retry_after:
            return None
        return self._spend(wait)

    def _may_retry(self, attempt: int) -> bool:
        if attempt >= self.config.max_attempts:
            return False
        requests, retries = self._totals()
        return retries < max(MIN_RETRIES, self.config.budget * requests)

    def _spend(self, wait: float) -> float:
        self._second()[2] += 1
        return wait

    def _second(self) -> list[int]:
        """The counters of the current second, after dropping those older than
        ``BUDGET_WINDOW``."""
        now = self._clock()
        window = self._window
        while window and window[0][0] < now - BUDGET_WINDOW:
            window.popleft()
        second = int(now)
        if not window or window[-1][0] != second:
            window.append([second, 0, 0])
        return window[-1]

    def _totals(self) -> tuple[int, int]:
        self._second()
        return (sum(counts[1] for counts in self._window),
                sum(counts[2] for counts in self._window))

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.config.max_delay, self.config.base_delay * 2 ** (attempt - 1))
        return float(self._draw() * ceiling)


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delay-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
