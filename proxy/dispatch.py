"""Where an answer comes from: the worker owning the request's key (multi-worker mode),
the cache, an identical request in flight, or a new upstream call, in that order.

A request nobody may share (``sharing.ALONE``) takes the direct path: its handler sends
the upstream request itself and relays the live answer; a client that leaves cancels it.
A shareable request goes through an :class:`~proxy.sharing.dedup.Exchange`, whose upstream call
runs in a background task so that one client leaving does not end it for the others;
the last one leaving does. The upstream calls themselves, under each provider's limit,
breaker and retries, are ``resilience/attempt.py``'s; a route of several deployments or
fallbacks tries them in turn (``resilience/failover.py``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from proxy.answers import Answer
from proxy.call import Call
from proxy.errors import GatewayError, UpstreamError
from proxy.headers import DEDUP_OPT
from proxy.record import Record
from proxy.resilience.attempt import UpstreamCall, Upstreams
from proxy.resilience.breaker import CircuitBreaker
from proxy.resilience.concurrency import AdaptiveLimiter
from proxy.resilience.failover import Balancer, FailoverCall
from proxy.resilience.retry import RetryPolicy
from proxy.routing import Route
from proxy.sharing.cache import AnswerCache
from proxy.sharing.dedup import Exchange, Head, InflightRequests
from proxy.sharing.peers import Peers
from proxy.sharing.policy import Sharing
from proxy.tasks import BackgroundTasks
from proxy.upstream.client import UpstreamClient


class Dispatcher:
    def __init__(self, client: UpstreamClient, tasks: BackgroundTasks,
                 inflight: InflightRequests, cache: AnswerCache,
                 limiters: Mapping[str, AdaptiveLimiter], max_buffer_bytes: int,
                 peers: Peers, retries: Mapping[str, RetryPolicy],
                 breakers: Mapping[str, CircuitBreaker]):
        # Per provider; public so that a reload can carry them over (gateway.py).
        self.retries = retries
        self.breakers = breakers
        self.limiters = limiters
        self._upstreams = Upstreams(client, limiters, retries, breakers)
        self._balancer = Balancer(limiters, breakers)
        self._tasks = tasks
        self._max_buffer = max_buffer_bytes
        self.inflight = inflight
        self.cache = cache
        self.peers = peers

    def __repr__(self) -> str:
        return f"<Dispatcher {self.inflight!r} {self.cache!r}>"

    def limits(self, provider: str) -> dict[str, float | int]:
        """The provider's concurrency limiter state, for ``/health``."""
        return self.limiters[provider].snapshot()

    def breaker(self, provider: str) -> dict[str, Any]:
        """The provider's circuit breaker state, for ``/health``."""
        return self.breakers[provider].snapshot()

    def answer(self, call: Call, route: Route, sharing: Sharing, record: Record
               ) -> AbstractAsyncContextManager[Answer]:
        """The answer to ``call``, for the ``async with`` that relays it."""
        if sharing.key is None:  # the direct path: no generator-based context manager
            return self._upstream_call(call, route, record)
        return self._shared(call, route, sharing, record)

    @asynccontextmanager
    async def _shared(self, call: Call, route: Route, sharing: Sharing,
                      record: Record) -> AsyncIterator[Answer]:
        assert sharing.key is not None
        owner = self.peers.owner(sharing.key) if sharing.forwardable else None
        if owner is not None:
            waited_from = time.perf_counter()
            record.peer = True
            async with self.peers.answer(call, owner, sharing.control) as answer:
                record.upstream_wait += time.perf_counter() - waited_from
                yield answer
            return
        cached = await self.cache.lookup(sharing.key) if sharing.cache_read else None
        if cached is not None:
            cached.headers["X-Cache"] = "HIT"
            record.cache = "hit"
            yield cached
            return
        exchange, role = self._exchange(call, route, sharing)
        subscription = exchange.subscribe()
        try:
            waited_from = time.perf_counter()
            answer = await subscription.answer()
            record.upstream_wait += time.perf_counter() - waited_from
            if sharing.dedup:
                answer.headers[DEDUP_OPT] = record.dedup = role
            if sharing.cache_write:
                answer.headers["X-Cache"] = "MISS"
                record.cache = "miss"
            yield answer
        finally:
            exchange.leave(subscription)

    def _upstream_call(self, call: Call, route: Route, record: Record | None
                       ) -> UpstreamCall | FailoverCall:
        if route.single:
            return self._upstreams.call(call, route.provider, record, may_retry=True)
        return FailoverCall(call, self._balancer.candidates(route), self._upstreams,
                            record, route.deployments)

    def _exchange(self, call: Call, route: Route, sharing: Sharing
                  ) -> tuple[Exchange, str]:
        assert sharing.key is not None
        if sharing.dedup:
            joined = self.inflight.join(sharing.key)
            if joined is not None:
                return joined, "follower"
            exchange = self.inflight.lead(sharing.key)
        else:
            exchange = Exchange(sharing.key, self._max_buffer)
        exchange.task = self._tasks.spawn(self._produce(exchange, call, route, sharing),
                                          name=f"exchange:{route.provider.name}")
        return exchange, "leader"

    async def _produce(self, exchange: Exchange, call: Call, route: Route,
                       sharing: Sharing) -> None:
        """Read one upstream answer into ``exchange`` (a background task)."""
        upstream = self._upstream_call(call, route, None)
        try:
            answer = await upstream.start()
            try:
                exchange.set_head(Head(answer.status, answer.reason,
                                       tuple(answer.headers.items()), answer.complete,
                                       answer.origin))
                while (chunk := await answer.body.next()) is not None:
                    exchange.append(chunk)
                    await exchange.room()
            except BaseException:
                upstream.finish(failed=True)
                raise
            upstream.finish(failed=False)
            exchange.finish()
            if sharing.cache_write and answer.status == 200 and exchange.chunks:
                assert exchange.head is not None and sharing.key is not None
                await self.cache.store(sharing.key, answer.status, answer.reason,
                                       exchange.head.headers, exchange.chunks)
        except GatewayError as error:
            exchange.finish(error)
        except asyncio.CancelledError:
            if not exchange.done:  # (not while storing a finished answer in the cache)
                exchange.finish(UpstreamError("the upstream call was cancelled"))
            raise
        finally:
            self.inflight.settled(exchange)


