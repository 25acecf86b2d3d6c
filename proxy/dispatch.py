"""Where an answer comes from: the worker owning the request's key (multi-worker mode),
the cache, an identical request in flight, or a new upstream call, in that order.

A request nobody may share (``sharing.ALONE``) takes the direct path: its handler sends
the upstream request itself and relays the live answer; a client that leaves cancels it.
A shareable request goes through an :class:`~proxy.sharing.dedup.Exchange`, whose upstream call
runs in a background task so that one client leaving does not end it for the others;
the last one leaving does. Every upstream call first takes a slot from its provider's
adaptive concurrency limit (``resilience/concurrency.py``), which may shed it with a 503.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from proxy.answers import Answer, AnswerCall, read_upstream
from proxy.call import Call
from proxy.errors import RETRYABLE_ERRORS, GatewayError, UpstreamError
from proxy.headers import DEDUP_OPT, PROVIDER
from proxy.providers import Provider
from proxy.record import Origin, Record
from proxy.resilience.breaker import FAILURE_STATUSES, CircuitBreaker, Pass, fault
from proxy.resilience.concurrency import AdaptiveLimiter, Outcome, Permit
from proxy.resilience.failover import Balancer, FailoverCall
from proxy.resilience.retry import RetryPolicy
from proxy.routing import Route, Target
from proxy.sharing.cache import AnswerCache
from proxy.sharing.dedup import Exchange, Head, InflightRequests
from proxy.sharing.peers import Peers
from proxy.sharing.policy import Sharing
from proxy.tasks import BackgroundTasks
from proxy.upstream.client import UpstreamClient, UpstreamRequest
from proxy.upstream.protocol import UpstreamProtocol

OVERLOAD_STATUSES = frozenset({429, 503})


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
        self._balancer = Balancer(limiters, breakers)
        self._client = client
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
            return self._deployment_call(call, route.provider, record, may_retry=True)
        return FailoverCall(call, self._balancer.candidates(route), self._failover_leg,
                            record, route.deployments)

    def _failover_leg(self, call: Call, target: Target, may_retry: bool) -> UpstreamCall:
        return self._deployment_call(call, target.provider, None, may_retry=may_retry)

    def _deployment_call(self, call: Call, provider: Provider, record: Record | None, *,
                         may_retry: bool) -> UpstreamCall:
        name = provider.name
        return UpstreamCall(self._client, self.limiters[name], call, provider, record,
                            self.retries[name] if may_retry else None, self.breakers[name])

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
            except BaseException as exc:
                answer.failed = isinstance(exc, GatewayError)  # the upstream broke
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


class UpstreamCall(AnswerCall):
    """One upstream call under its provider's concurrency limit, from the slot taken to
    the connection given back; as an async context manager, the direct path's answer.
    A class rather than stacked context managers: this is the hot path, and each layer
    of those showed in the profile."""

    __slots__ = (
        "_breaker",
        "_call",
        "_client",
        "_connection",
        "_headers_seen",
        "_judge_body",
        "_limiter",
        "_outcome",
        "_permit",
        "_provider",
        "_record",
        "_retry",
        "tries",
    )

    def __init__(self, client: UpstreamClient, limiter: AdaptiveLimiter, call: Call,
                 provider: Provider, record: Record | None, retry: RetryPolicy | None,
                 breaker: CircuitBreaker):
        super().__init__()
        self._breaker = breaker
        self._record = record
        self._retry = retry
        self._client = client
        self._limiter = limiter
        self._call = call
        self._provider = provider
        self._connection: UpstreamProtocol | None = None
        self._permit: Permit | None = None
        self._outcome = Outcome.IGNORE
        self._headers_seen = False  # an error after them is not a connection error
        self._judge_body = False  # the breaker's verdict waits for the body (finish)
        self.tries = 0  # attempts sent (for the answer's ``Origin``)

    async def start(self) -> Answer:
        """The answer's head (an error answer whole), after as many attempts as the
        retry policy allows: nothing has reached the client yet, so a retry is unseen."""
        request = self._provider.prepare(self._call)
        queued = time.perf_counter()  # waits (slots, backoff) are the upstream's time
        retry = self._retry
        try:
            if retry is None:  # a failover leg: the next deployment is the retry
                answer = await self._attempt(request)
            else:
                answer = await self._attempts(request, retry)
        finally:  # failed tries, their backoff and deadlines too are the upstream's time
            record = self._record
            if record is not None:
                record.upstream_wait += time.perf_counter() - queued
                if record.origin is not None:  # (the answer's own replaces it)
                    record.origin.attempts = self.tries
        answer.headers[PROVIDER] = self._provider.name
        answer.origin = Origin(self._provider.name, self._call.upstream_model, self.tries)
        return answer

    async def _attempts(self, request: UpstreamRequest, retry: RetryPolicy) -> Answer:
        retry.record_request()
        attempt = 1
        while True:
            try:
                answer = await self._attempt(request)
            except RETRYABLE_ERRORS:
                delay = retry.after_error(attempt)
                if delay is None or not self._breaker.available:
                    raise  # (a retry into an open circuit would hide this error)
            else:
                delay = retry.after_status(attempt, answer.status, answer.headers)
                if delay is None or not self._breaker.available:
                    return answer
                self.finish(failed=False)  # its error body was read whole
            await asyncio.sleep(delay)
            attempt += 1

    async def _attempt(self, request: UpstreamRequest) -> Answer:
        """One try: take a slot, send, read the head (and an error answer's body)."""
        provider = self._provider
        self._outcome, self._headers_seen = Outcome.IGNORE, False
        self.tries += 1
        breaker = self._breaker
        how = breaker.check()  # open with fail_fast: 503 at once, no slot taken
        try:
            self._permit = await self._limiter.acquire()
        except BaseException:
            breaker.record(failed=None, how=how)
            raise
        try:
            self._connection, response = await self._client.send(request, provider.name)
            self._headers_seen = True
            overloaded = response.status in OVERLOAD_STATUSES
            self._outcome = Outcome.OVERLOAD if overloaded else Outcome.SUCCESS
            answer = await read_upstream(self._call, provider, response)
        except BaseException as exc:
            # The same faults for both: not a full pool (shared by every provider), not a
            # deadline a long answer explains (a non-stream answer past `total`).
            upstream_failed = fault(exc, self._call.stream)
            if upstream_failed and not self._headers_seen:
                self._outcome = Outcome.ERROR
            breaker.record(failed=upstream_failed, how=how, caller=self._call.caller,
                           connection=True)
            self.finish(failed=True)
            raise
        if answer.complete or how is not Pass.CLOSED:  # a probe, panic: the head decides
            breaker.record(failed=answer.status in FAILURE_STATUSES, how=how,
                           caller=self._call.caller)
        else:  # a cut mid-body still fails it
            self._judge_body = True
            self._answer = answer
        return answer

    def finish(self, *, failed: bool) -> None:
        """Give the connection back (closed when ``failed``) and the slot."""
        connection, self._connection = self._connection, None
        if self._judge_body:
            self._judge_body = False
            # A body deadline is this request's length, and a client that left says
            # nothing of the upstream; a cut is the upstream's.
            expired = connection is not None and connection.expired
            broke = self._answer is not None and self._answer.failed
            self._breaker.record(failed=None if expired or (failed and not broke) else broke,
                                 connection=True,
                                 caller=self._call.caller)
        if connection is not None:
            self._client.done(connection, reuse=not failed)
        permit, self._permit = self._permit, None
        if permit is not None:
            permit.release(self._outcome)
