"""The deadlines of an upstream exchange (issue #4): the :class:`Deadlines` one
provider's exchanges run under, from the ``timeouts:`` section and a provider entry's
``timeouts:`` (``config/timeouts.py``).

Five deadlines, each with its own error (``errors.py``), one per phase of an answer::

    connect      connection opened (TCP, TLS)        504 connect_timeout
    headers      request sent -> status + headers    504 upstream_headers_timeout
    first_token  headers -> first body bytes         504 first_token_timeout
    read         longest silence between two reads   504 stream_stalled
    total        request sent -> last byte (off)     504 request_timeout

``headers`` and ``first_token`` default to ``read``, which bounded every silence before
they existed, so a configuration that only sets ``read`` behaves as it did. ``total`` is
off by default: a long generation that keeps streaming is never cut unless the operator
asks for it (STYLE.md point 10).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config.timeouts import TimeoutOverrides, Timeouts


@dataclass(frozen=True, slots=True)
class Deadlines:
    """What one provider's exchanges run under, every fallback resolved."""

    connect: float
    headers: float
    first_token: float
    read: float
    total: float | None  # None: no bound on the whole answer

    @classmethod
    def of(cls, timeouts: Timeouts, overrides: TimeoutOverrides | None = None) -> Deadlines:
        """``overrides`` first, then ``timeouts``; ``headers`` and ``first_token`` left
        unset in both take the resolved ``read``."""
        given = overrides or TimeoutOverrides()

        def pick(key: str) -> Any:
            value = getattr(given, key)
            return getattr(timeouts, key) if value is None else value

        read = pick("read")
        return cls(connect=pick("connect"), headers=pick("headers") or read,
                   first_token=pick("first_token") or read, read=read,
                   total=pick("total") or None)


