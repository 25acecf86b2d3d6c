"""The ``timeouts:`` section, and a provider entry's ``timeouts:`` that overrides it key
by key; ``upstream/deadlines.py`` turns them into the deadlines an exchange runs under."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config import validate as v

DEADLINE_KEYS = ("connect", "headers", "first_token", "read", "total")


@dataclass(frozen=True)
class Timeouts:
    """Seconds. ``read`` bounds the silence between two reads, not the whole answer;
    ``headers`` and ``first_token`` (None: as ``read``) bound the wait for the answer's
    head and for its first body bytes; ``total`` (None: off) the whole answer."""

    connect: float = 5.0
    headers: float | None = None
    first_token: float | None = None
    read: float = 300.0
    total: float | None = None  # None or 0: off
    discovery: float = 10.0
    # While a 200 event stream waits for its first event: an SSE comment this often, so
    # idle timeouts of load balancers in front never cut a slow start (0: none).
    sse_keepalive: float = 5.0


@dataclass(frozen=True)
class TimeoutOverrides:
    """A provider entry's ``timeouts:``: each key given replaces the global one
    (``total: 0`` turns a global ``total`` off for this provider)."""

    connect: float | None = None
    headers: float | None = None
    first_token: float | None = None
    read: float | None = None
    total: float | None = None


def parse_timeouts(raw: Any, problems: list[str]) -> Timeouts:
    """The global ``timeouts:`` section."""
    return v.section(raw, "timeouts", Timeouts, problems, {
        **_DEADLINE_FIELDS, "discovery": v.positive_number,
        "sse_keepalive": v.non_negative_number})


def parse_overrides(raw: Any, path: str, problems: list[str]) -> TimeoutOverrides:
    """A provider entry's ``timeouts:`` (``path`` is its key path)."""
    overrides = v.section(raw, path, TimeoutOverrides, problems, {
        **{key: v.positive_number for key in DEADLINE_KEYS}, "total": v.non_negative_number})
    return overrides


def optional_positive(value: Any) -> float | None:
    """A positive number of seconds, or null: as ``read``."""
    return None if value is None else v.positive_number(value)


def optional_total(value: Any) -> float | None:
    """Seconds; null or 0: off."""
    return None if value is None else v.non_negative_number(value)

_DEADLINE_FIELDS = {"connect": v.positive_number, "headers": optional_positive,
                    "first_token": optional_positive, "read": v.positive_number,
                    "total": optional_total}
