"""An upstream answer as the gateway relays it: status, client-facing headers, and a body
whose chunks arrive over time.

Three sources produce an :class:`Answer`, and ``streaming.send_answer`` writes any of
them to a client the same way: a live upstream response (:func:`read_upstream`), a shared
in-flight exchange (``dedup.Subscription``) and a cached answer (``cache.CachedAnswer``).
A body is read with one ``await body.next()`` per chunk (``None`` at its end), not
through stacked async generators: on the hot path each layer of those cost more than
the work it did (issue #3's profile). Upstream failures surface from ``next()`` as
``GatewayError``, so writers never see aiohttp's exceptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import aiohttp
from multidict import CIMultiDict

from proxy.call import Call
from proxy.errors import UpstreamError
from proxy.headers import client_response_headers
from proxy.providers import Provider
from proxy.record import Origin
from proxy.upstream.client import UPSTREAM_EXCEPTIONS, translate_exception
from proxy.upstream.protocol import UpstreamResponse

EVENT_STREAM = "text/event-stream"
MAX_ERROR_BODY = 1024 * 1024


class Body(Protocol):
    async def next(self) -> bytes | None:
        """The next chunk, ``None`` at the end; raises ``GatewayError`` on failure."""


@dataclass(slots=True)
class Answer:
    status: int
    reason: str
    headers: CIMultiDict[str]
    body: Body
    # An error answer (status >= 400) has its whole body in one chunk: it is sent as a
    # plain response with Content-Length, never streamed.
    complete: bool = False
    # Which provider answered, after how many tries (``record.Origin``); None for a
    # cached answer. Read into the request's record by the handler.
    origin: Origin | None = None
    # The live upstream body as read_upstream made it, whoever wraps ``body`` later (the
    # usage tap): it alone says whether the upstream broke mid-body.
    source: StreamBody | IteratorBody | None = None

    @property
    def broke(self) -> bool:
        """The upstream failed mid-body (not the client): the circuit breaker counts it
        (``UpstreamCall.finish`` in ``resilience/attempt.py``)."""
        return self.source is not None and self.source.broke

    @property
    def event_stream(self) -> bool:
        return self.headers.get("Content-Type", "").startswith(EVENT_STREAM)


class AnswerCall:
    """An upstream call as the ``async with`` that relays its answer: ``start`` gives
    the answer's head, ``finish`` ends the call (``UpstreamCall`` in
    ``resilience/attempt.py``, ``FailoverCall`` in ``resilience/failover.py``)."""

    __slots__ = ("_answer",)

    def __init__(self) -> None:
        self._answer: Answer | None = None  # the one ``start`` returned

    async def start(self) -> Answer:
        raise NotImplementedError

    def finish(self, *, failed: bool) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Answer:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, traceback: TracebackType | None) -> None:
        self.finish(failed=exc_type is not None)


class StreamBody:
    """A live upstream body, relayed as the socket delivers it. ``broke``: a read
    failed (the upstream cut it, a deadline passed), the one place that learns it."""

    __slots__ = ("_content", "_source", "broke")

    def __init__(self, content: aiohttp.StreamReader, source: str):
        self._content = content
        self._source = source
        self.broke = False

    async def next(self) -> bytes | None:
        try:
            chunk = await self._content.readany()
        except UPSTREAM_EXCEPTIONS as exc:
            self.broke = True
            raise translate_exception(exc, self._source) from exc
        return chunk or None


class IteratorBody:
    """A body produced by an async iterator (a provider's translation)."""

    __slots__ = ("_chunks", "_source", "broke")

    def __init__(self, chunks: AsyncIterator[bytes], source: str):
        self._chunks = chunks
        self._source = source
        self.broke = False  # as StreamBody's; also for an answer that did not translate

    async def next(self) -> bytes | None:
        try:
            return await anext(self._chunks)
        except StopAsyncIteration:
            return None
        except UPSTREAM_EXCEPTIONS as exc:
            self.broke = True
            raise translate_exception(exc, self._source) from exc
        except UpstreamError:
            self.broke = True
            raise


class ReplayBody:
    """Chunks already in memory: an error body, a cached answer."""

    __slots__ = ("_chunks", "_index")

    def __init__(self, chunks: Sequence[bytes]):
        self._chunks = chunks
        self._index = 0

    async def next(self) -> bytes | None:
        if self._index >= len(self._chunks):
            return None
        self._index += 1
        return self._chunks[self._index - 1]


async def read_upstream(call: Call, provider: Provider,
                        upstream: UpstreamResponse) -> Answer:
    """The answer of a live upstream response, translated by ``provider``."""
    headers = client_response_headers(upstream.headers, call.request_id)
    if upstream.status >= 400:
        body = await _read_error_body(upstream, provider.name)
        headers.popall("Content-Length", None)
        translated = provider.translate_error(call, upstream.status, body)
        if translated is not body:
            headers.popall("Content-Encoding", None)
            headers["Content-Type"] = "application/json"
        return Answer(upstream.status, upstream.reason, headers, ReplayBody((translated,)),
                      complete=True)
    body_source: Body
    if provider.translates_body:
        headers = provider.translate_headers(call, headers)
        chunks = provider.translate_stream(call, upstream.content.iter_any())
        body_source = IteratorBody(chunks, provider.name)
    else:
        body_source = StreamBody(upstream.content, provider.name)
    answer = Answer(upstream.status, upstream.reason, headers, body_source,
                    source=body_source)
    if answer.event_stream:
        answer.headers["X-Accel-Buffering"] = "no"
    return answer


async def from_response(response: aiohttp.ClientResponse, request_id: str, name: str
                        ) -> Answer:
    """An answer relayed untouched from another HTTP hop (a peer worker)."""
    upstream = UpstreamResponse(response.status, response.reason or "", response.headers,
                                response.content)
    headers = client_response_headers(upstream.headers, request_id)
    headers.popall("X-Gateway-Overhead-Ms", None)
    if upstream.status >= 400:
        body = await _read_error_body(upstream, name)
        headers.popall("Content-Length", None)
        return Answer(upstream.status, upstream.reason, headers, ReplayBody((body,)),
                      complete=True)
    return Answer(upstream.status, upstream.reason, headers, StreamBody(upstream.content, name))


async def _read_error_body(upstream: UpstreamResponse, source: str) -> bytes:
    parts: list[bytes] = []
    size = 0
    try:
        while size < MAX_ERROR_BODY:
            part = await upstream.content.read(MAX_ERROR_BODY - size)
            if not part:
                break
            parts.append(part)
            size += len(part)
    except UPSTREAM_EXCEPTIONS as exc:
        raise translate_exception(exc, source) from exc
    return b"".join(parts)
