"""An upstream answer as the gateway relays it: status, client-facing headers, and body
chunks that arrive over time.

Three sources produce an :class:`Answer`, and ``streaming.send_answer`` writes any of
them to a client the same way: a live upstream response (:func:`read_upstream`), a shared
in-flight exchange (``dedup.Exchange.subscribe``) and a cached answer
(``cache.CachedAnswer.replay``). Upstream failures while reading surface from ``chunks``
as ``GatewayError``, so writers never see aiohttp's exceptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from proxy.headers import client_response_headers
from proxy.http1 import UpstreamResponse
from proxy.providers import Call, Provider
from proxy.upstream import UPSTREAM_EXCEPTIONS, translate_exception

EVENT_STREAM = "text/event-stream"
MAX_ERROR_BODY = 1024 * 1024


@dataclass(slots=True)
class Answer:
    status: int
    reason: str
    headers: CIMultiDict[str]
    chunks: AsyncIterator[bytes]
    # An error answer (status >= 400) has its whole body in one chunk: it is sent as a
    # plain response with Content-Length, never streamed.
    complete: bool = False

    @property
    def event_stream(self) -> bool:
        return self.headers.get("Content-Type", "").startswith(EVENT_STREAM)


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
        return Answer(upstream.status, upstream.reason, headers, one_chunk(translated),
                      complete=True)
    headers = provider.translate_headers(call, headers)
    chunks = provider.translate_stream(call, upstream.content.iter_any())
    answer = Answer(upstream.status, upstream.reason, headers,
                    _gateway_errors(chunks, provider.name))
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
        return Answer(upstream.status, upstream.reason, headers, one_chunk(body), complete=True)
    return Answer(upstream.status, upstream.reason, headers,
                  _gateway_errors(upstream.content.iter_any(), name))


async def one_chunk(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _gateway_errors(chunks: AsyncIterator[bytes], provider: str
                          ) -> AsyncIterator[bytes]:
    """``chunks`` with aiohttp failures turned into gateway errors, here and only here."""
    try:
        async for chunk in chunks:
            yield chunk
    except UPSTREAM_EXCEPTIONS as exc:
        raise translate_exception(exc, provider) from exc


async def _read_error_body(upstream: UpstreamResponse, provider: str) -> bytes:
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
        raise translate_exception(exc, provider) from exc
    return b"".join(parts)
