"""Relaying the upstream's answer to the client, once its status is known.

* An error status (>= 400) is buffered (error bodies are small) and relayed with its
  status, end-to-end headers and body, so the client's SDK raises the provider's own
  error (``RateLimitError`` with the provider's ``Retry-After``, say).
* Any other answer streams: each chunk is written to the client as it arrives, nothing
  holds a whole response. Event streams get ``X-Accel-Buffering: no`` so an nginx in
  front passes each event on at once.
* After the first byte there is no second status (STYLE.md point 11): an upstream that
  fails mid-answer ends an event stream with an SSE ``error`` event and never with
  ``data: [DONE]``, and any other body by aborting the connection, so a truncated
  answer can never look complete.

Reading from the upstream and writing to the client fail differently and are kept
apart: a client that went away raises out of here (and the upstream request is closed by
``UpstreamClient.open``), an upstream failure is reported to the client.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from proxy.errors import GatewayError, sse_error_event
from proxy.headers import client_response_headers
from proxy.providers import Call, Provider
from proxy.upstream import UPSTREAM_EXCEPTIONS, translate_exception

log = logging.getLogger("proxy.streaming")

EVENT_STREAM = "text/event-stream"
MAX_ERROR_BODY = 1024 * 1024


async def relay(request: web.Request, call: Call, provider: Provider,
                upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    if upstream.status >= 400:
        return await _relay_error(call, provider, upstream)
    headers = provider.translate_headers(
        call, client_response_headers(upstream.headers, call.request_id))
    event_stream = headers.get("Content-Type", "").startswith(EVENT_STREAM)
    if event_stream:
        headers["X-Accel-Buffering"] = "no"
    chunks = provider.translate_stream(call, upstream.content.iter_any())
    # A buffered-style answer is checked before the status goes out: a translation
    # that fails on it still becomes a clean 502 instead of a cut-off 200.
    first = b"" if event_stream or call.stream else await _next_chunk(chunks, provider)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                  headers=headers)
    await response.prepare(request)
    try:
        chunk: bytes | None = first
        while chunk is not None:
            if chunk:
                await response.write(chunk)
            chunk = await _next_chunk(chunks, provider)
    except GatewayError as error:
        await _end_with_error(request, response, error, event_stream, provider)
        return response
    await response.write_eof()
    return response


async def _next_chunk(chunks: AsyncIterator[bytes], provider: Provider) -> bytes | None:
    """The next piece of the answer, ``None`` at its end; upstream failures become
    gateway errors here and only here."""
    try:
        return await anext(chunks)
    except StopAsyncIteration:
        return None
    except UPSTREAM_EXCEPTIONS as exc:
        raise translate_exception(exc, provider.name) from exc


async def _end_with_error(request: web.Request, response: web.StreamResponse,
                          error: GatewayError, event_stream: bool, provider: Provider) -> None:
    log.warning("upstream '%s' failed mid-answer (%s): %s", provider.name, error.code,
                error.message)
    if event_stream:
        await response.write(sse_error_event(error))
        await response.write_eof()
        return
    response.force_close()
    if request.transport is not None:
        request.transport.abort()


async def _relay_error(call: Call, provider: Provider,
                       upstream: aiohttp.ClientResponse) -> web.Response:
    try:
        body = await _read_up_to(upstream.content, MAX_ERROR_BODY)
    except UPSTREAM_EXCEPTIONS as exc:
        raise translate_exception(exc, provider.name) from exc
    headers = client_response_headers(upstream.headers, call.request_id)
    headers.popall("Content-Length", None)
    translated = provider.translate_error(call, upstream.status, body)
    if translated is not body:
        headers.popall("Content-Encoding", None)
        headers["Content-Type"] = "application/json"
    return web.Response(status=upstream.status, reason=upstream.reason, headers=headers,
                        body=translated)


async def _read_up_to(content: aiohttp.StreamReader, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while size < limit:
        part = await content.read(limit - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)
