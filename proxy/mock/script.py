"""How the mock upstream is scripted: options for every request, headers for one.

:class:`MockOptions` is fixed when the app is built. A test that needs one odd request
(slow, failing, cut mid-stream) sends ``X-Mock-*`` headers instead of building a second
server; :func:`plan_for` merges the two into a :class:`Plan`. Bad values anywhere raise
early: ``ValueError`` at construction, :class:`MockError` (a 400) per request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from proxy.mock import payloads

_T = TypeVar("_T")


def _is_seconds(value: float) -> bool:
    return math.isfinite(value) and value >= 0


@dataclass(frozen=True)
class MockOptions:
    """How the mock behaves for every request; per-request headers may override some fields."""

    latency: float = 0.0
    """Seconds to wait before sending response headers (inference endpoints only)."""
    chunks: int = 8
    """Number of content chunks in a streamed answer."""
    interval: float = 0.0
    """Seconds between streamed content chunks."""
    error_rate: float = 0.0
    """Fraction (0..1) of inference requests answered with an injected 500."""
    models: tuple[str, ...] = ("mock-gpt", "mock-embed")
    embedding_dim: int = 8
    seed: int = 0
    """Seed of the one ``random.Random`` behind ``error_rate``, so failures are reproducible."""

    def __post_init__(self) -> None:
        """Reject nonsense at construction, so a bad CLI flag fails at start, not per request."""
        for name in ("latency", "interval"):
            if not _is_seconds(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number >= 0")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")
        if self.chunks < 1:
            raise ValueError("chunks must be >= 1")
        if self.embedding_dim < 1:
            raise ValueError("embedding_dim must be >= 1")


@dataclass
class MockStats:
    """Request counters tests and benchmarks assert on; mutated only by the app's middleware.

    Per app, hence per worker process.
    """

    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    cancelled: int = 0
    """Handlers cancelled because their client went away (needs ``handler_cancellation``)."""


class MockError(Exception):
    """An OpenAI-shaped error answer: raised anywhere in a handler, rendered by the middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param

    def response(self) -> web.Response:
        """The error as a JSON response; 429 carries ``Retry-After`` like the real API."""
        headers = {"Retry-After": "1"} if self.status == 429 else None
        body = payloads.error_body(self.message, self.type, self.code, self.param)
        return web.Response(
            status=self.status, body=body, content_type="application/json", headers=headers
        )


@dataclass(frozen=True, slots=True)
class Plan:
    """What one request should do: the options with any ``X-Mock-*`` overrides applied."""

    latency: float
    chunks: int
    interval: float
    status: int | None = None
    disconnect_after: int | None = None

    @classmethod
    def default(cls, options: MockOptions) -> Plan:
        """The plan of a request without ``X-Mock-*`` headers; built once per app."""
        return cls(options.latency, options.chunks, options.interval)


HEADERS = (
    "X-Mock-Latency",
    "X-Mock-Chunks",
    "X-Mock-Interval",
    "X-Mock-Status",
    "X-Mock-Disconnect-After",
)


def _seconds(text: str) -> float:
    value = float(text)
    if not _is_seconds(value):
        raise ValueError(text)
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(text)
        return value

    return parse


def _error_status(text: str) -> int:
    value = int(text)
    if not 400 <= value <= 599:
        raise ValueError(text)
    return value


def _header(headers: Mapping[str, str], name: str, parse: Callable[[str], _T], default: _T) -> _T:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError:
        message = f"invalid {name} header: {raw!r}"
        raise MockError(400, message, code="invalid_mock_header") from None


def plan_for(headers: Mapping[str, str], default: Plan) -> Plan:
    """Apply ``X-Mock-*`` headers; the usual no-header case builds no object (benchmarks)."""
    if not any(name in headers for name in HEADERS):
        return default
    return Plan(
        latency=_header(headers, "X-Mock-Latency", _seconds, default.latency),
        chunks=_header(headers, "X-Mock-Chunks", _at_least(1), default.chunks),
        interval=_header(headers, "X-Mock-Interval", _seconds, default.interval),
        status=_header(headers, "X-Mock-Status", _error_status, None),
        disconnect_after=_header(headers, "X-Mock-Disconnect-After", _at_least(0), None),
    )


def scripted_failure(status: int) -> MockError:
    """The error ``X-Mock-Status`` asks for, labelled the way OpenAI labels that status."""
    type_, code = payloads.status_labels(status)
    return MockError(status, f"scripted failure (X-Mock-Status: {status})", type_, code)


def injected_failure() -> MockError:
    """The 500 that ``error_rate`` injects; its code tells it apart from real bugs."""
    return MockError(500, "injected failure", "server_error", "mock_injected_error")
