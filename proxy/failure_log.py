"""One warning line per gateway failure a client gets, throttled (issue #4 fault tests:
an outage showed no 502 or 504 in the log at all)."""

from __future__ import annotations

import logging
import time

from proxy.errors import GatewayError

log = logging.getLogger("proxy.errors")


class FailureLog:
    """A warning for each gateway failure (5xx) a client gets, so an operator sees 502s,
    504s and open circuits in the log; at most one line per error code per second,
    counting the ones folded into it, so an outage cannot flood the log. Messages carry
    no secrets (``errors.py``)."""

    def __init__(self, interval: float = 1.0):
        self._interval = interval
        self._last: dict[str | None, float] = {}
        self._folded: dict[str | None, int] = {}

    def __call__(self, request_line: str, request_id: str, error: GatewayError) -> None:
        now = time.monotonic()
        code = error.code
        if now - self._last.get(code, -self._interval) < self._interval:
            self._folded[code] = self._folded.get(code, 0) + 1
            return
        self._last[code] = now
        folded = self._folded.pop(code, 0)
        more = f" (and {folded} more since the last line)" if folded else ""
        log.warning("%s -> %d %s [request %s]: %s%s", request_line, error.status, code,
                    request_id, error.message, more)
