"""The real gateway running in the test's process, with its state in reach (issue 11: "one
gateway fixture that also exposes the running gateway's state, so tests poll state
instead of sleeping").

The ``live_gateway`` fixture (conftest.py) builds the app with ``proxy.app.build_app``
and serves it with the production runner (``proxy.server.serve.running``) in front of
the counting fake upstream; it returns a :class:`RunningGateway`: the URL, the app, and
what the app holds under its typed keys: the ``LIVE`` gateway in force (config,
dispatcher), the in-flight map of deduplication, each provider's limiter and breaker,
the metrics. ``until(predicate)`` polls one of them (tests/polling.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from proxy.dispatch import Dispatcher
from proxy.gateway import Gateway, Live
from proxy.observe.metrics import METRICS, Metrics
from proxy.resilience.breaker import CircuitBreaker
from proxy.resilience.concurrency import AdaptiveLimiter
from proxy.sharing.dedup import InflightRequests
from proxy.state import LIVE
from tests import polling
from tests.fake_upstream import FakeUpstream


@dataclass
class RunningGateway:
    url: str  # base URL, without /v1
    app: web.Application
    upstream: FakeUpstream  # the first provider's fake upstream

    def __repr__(self) -> str:
        return f"<RunningGateway {self.url} {self.dispatcher!r} {self.upstream!r}>"

    @property
    def live(self) -> Live:
        return self.app[LIVE]

    @property
    def gateway(self) -> Gateway:
        """The gateway in force: a reload replaces it."""
        return self.live.gateway

    @property
    def dispatcher(self) -> Dispatcher:
        return self.gateway.dispatcher

    @property
    def inflight(self) -> InflightRequests:
        """Deduplication's in-flight map: ``len``, ``led``, ``followed``."""
        return self.dispatcher.inflight

    def limiter(self, provider: str = "up") -> AdaptiveLimiter:
        return self.dispatcher.limiters[provider]

    def breaker(self, provider: str = "up") -> CircuitBreaker:
        return self.dispatcher.breakers[provider]

    @property
    def metrics(self) -> Metrics:
        return self.app[METRICS]

    async def until(self, predicate: Callable[[], object | Awaitable[object]],
                    within: float = 2.0, what: str = "") -> None:
        """Poll ``predicate`` (bounded) instead of sleeping (tests/polling.py); a failure
        shows the state it ended in."""
        try:
            await polling.until(predicate, within, what)
        except AssertionError as failed:
            raise AssertionError(f"{failed}; {self!r}") from None
