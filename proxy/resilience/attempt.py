"""One upstream call to one provider: a slot of its adaptive limit, its circuit
breaker's verdict, and as many attempts as its retry policy allows (issue #4, #9).

:class:`Upstreams` is what every such call needs of the worker (the client and each
provider's limiter, retry policy and breaker); ``dispatch.py`` and
``failover.py`` make their calls from it, so neither calls back into the other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.answers import Answer, AnswerCall, read_upstream
from proxy.call import Call
from proxy.errors import RETRYABLE_ERRORS
from proxy.headers import PROVIDER
from proxy.providers import Provider
from proxy.record import Origin, Record
from proxy.resilience.breaker import FAILURE_STATUSES, CircuitBreaker, Pass, fault
from proxy.resilience.concurrency import AdaptiveLimiter, Outcome, Permit
from proxy.resilience.retry import RetryPolicy
from proxy.upstream.client import UpstreamClient
from proxy.upstream.protocol import UpstreamProtocol, UpstreamRequest

OVERLOAD_STATUSES = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class Upstreams:
    """Per provider, the state its calls share: the same maps the ``Dispatcher`` shows
    (and a reload carries over, ``gateway.py``), read here by each call."""

    client: UpstreamClient
    limiters: Mapping[str, AdaptiveLimiter]
    retries: Mapping[str, RetryPolicy]
    breakers: Mapping[str, CircuitBreaker]

    def call(self, call: Call, provider: Provider, record: Record | None, *,
             may_retry: bool) -> UpstreamCall:
        """A call to ``provider``; ``may_retry`` False for a failover leg (the next
        deployment is its retry)."""
        name = provider.name
        return UpstreamCall(self.client, self.limiters[name], call, provider, record,
                            self.retries[name] if may_retry else None, self.breakers[name])


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
            broke = self._answer is not None and self._answer.broke
            self._breaker.record(failed=None if expired or (failed and not broke) else broke,
                                 connection=True,
                                 caller=self._call.caller)
        if connection is not None:
            self._client.done(connection, reuse=not failed)
        permit, self._permit = self._permit, None
        if permit is not None:
            permit.release(self._outcome)
