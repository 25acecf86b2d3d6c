"""The upstream client: one shared connection pool per worker, and the one table that
turns aiohttp's client exceptions into the gateway's error tree.

Two sessions, built once at start-up and closed at shutdown (``app.py``):

* the *inference* session, whose ``TCPConnector`` (aiodns resolver, DNS cache,
  keep-alive) carries every proxied request;
* a small *control* session for model discovery and health checks, so discovery never
  queues behind inference traffic in the inference pool (issue #2).

Both are set for relaying, not for browsing: no cookie jar (one client's cookies must
never reach another), no automatic decompression (bytes pass through with their
``Content-Encoding``), no automatic ``Accept-Encoding``/``User-Agent``/``Content-Type``
(only what the client sent), and no redirects followed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDict
from yarl import URL

from proxy.config import Config
from proxy.errors import (
    GatewayError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_CONTROL_POOL_LIMIT = 32

# Most specific first (httpx's map_httpcore_exceptions): the first match wins.
_EXCEPTION_TABLE: tuple[tuple[type[BaseException], type[UpstreamError], str], ...] = (
    (aiohttp.ConnectionTimeoutError, UpstreamTimeout, "timed out connecting to upstream"),
    (aiohttp.SocketTimeoutError, UpstreamTimeout, "timed out waiting for upstream to answer"),
    (TimeoutError, UpstreamTimeout, "timed out waiting for upstream"),
    (aiohttp.ClientConnectorError, UpstreamUnreachable, "cannot connect to upstream"),
    (aiohttp.ServerDisconnectedError, UpstreamUnreachable, "upstream closed the connection"),
    (aiohttp.ClientPayloadError, UpstreamProtocolError, "upstream answer was cut off"),
    (aiohttp.ClientResponseError, UpstreamProtocolError, "upstream sent an invalid answer"),
    (aiohttp.ClientConnectionError, UpstreamUnreachable, "upstream connection failed"),
    (aiohttp.ClientError, UpstreamError, "upstream request failed"),
)
UPSTREAM_EXCEPTIONS = (aiohttp.ClientError, TimeoutError)


def translate_exception(exc: BaseException, provider: str) -> GatewayError:
    """The gateway error for an aiohttp failure; the message names the provider only,
    never the URL or headers (they may carry credentials)."""
    for exc_type, error_type, message in _EXCEPTION_TABLE:
        if isinstance(exc, exc_type):
            detail = _os_detail(exc)
            return error_type(f"{message} '{provider}'{detail}")
    return UpstreamError(f"upstream request failed for '{provider}' ({type(exc).__name__})")


def _os_detail(exc: BaseException) -> str:
    """The OS reason ("connection refused") without the address asyncio puts in
    ``strerror``: the message must name the provider only."""
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno:
        return f": {os.strerror(exc.os_error.errno).lower()}"
    return ""


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """What a provider asks the client to send; built by ``Provider.prepare``."""

    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes


class UpstreamClient:
    """Sends upstream requests over the worker's shared pools."""

    def __init__(self, config: Config):
        self._config = config
        self._sessions: tuple[aiohttp.ClientSession, aiohttp.ClientSession] | None = None
        self.in_flight = 0

    def __repr__(self) -> str:
        state = "open" if self._sessions else "closed"
        return (f"<UpstreamClient {state} in_flight={self.in_flight} "
                f"pool_limit={self._config.pool.limit}>")

    async def start(self) -> None:
        """Create the sessions; called at start-up, inside the worker's event loop."""
        timeouts, pool = self._config.timeouts, self._config.pool
        inference = _session(
            limit=pool.limit, keepalive=pool.keepalive_timeout,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=timeouts.connect, sock_read=timeouts.read))
        control = _session(
            limit=_CONTROL_POOL_LIMIT, keepalive=pool.keepalive_timeout,
            timeout=aiohttp.ClientTimeout(total=timeouts.discovery,
                                          sock_connect=timeouts.connect))
        self._sessions = (inference, control)

    def _session_pair(self) -> tuple[aiohttp.ClientSession, aiohttp.ClientSession]:
        if self._sessions is None:
            raise RuntimeError("UpstreamClient used before start() or after close()")
        return self._sessions

    @asynccontextmanager
    async def open(self, request: UpstreamRequest, provider: str
                   ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send ``request``; yield the response once its headers arrived.

        On a normal exit the connection goes back to the pool; on any exception,
        cancellation included (the client went away), it is closed, which is what
        cancels the upstream generation.
        """
        self.in_flight += 1
        try:
            try:
                response = await self._session_pair()[0].request(
                    request.method, request.url, headers=request.headers,
                    data=request.body or None, allow_redirects=False)
            except UPSTREAM_EXCEPTIONS as exc:
                raise translate_exception(exc, provider) from exc
            try:
                yield response
            except BaseException:
                response.close()
                raise
            response.release()
        finally:
            self.in_flight -= 1

    async def get_json(self, url: URL, headers: Mapping[str, str], provider: str
                       ) -> tuple[int, Any]:
        """A control-plane GET (discovery, health): status and parsed JSON body."""
        try:
            control = self._session_pair()[1]
            async with control.get(url, headers=headers, allow_redirects=True) as resp:
                body = await resp.read()
        except UPSTREAM_EXCEPTIONS as exc:
            raise translate_exception(exc, provider) from exc
        try:
            return resp.status, orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return resp.status, None

    async def close(self) -> None:
        if self._sessions is not None:
            sessions, self._sessions = self._sessions, None
            for session in sessions:
                await session.close()


def _session(*, limit: int, keepalive: float, timeout: aiohttp.ClientTimeout
             ) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=limit, limit_per_host=0, use_dns_cache=True, ttl_dns_cache=300,
        keepalive_timeout=keepalive, resolver=aiohttp.AsyncResolver())
    return aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(), skip_auto_headers=_SKIP_AUTO_HEADERS,
        raise_for_status=False)
