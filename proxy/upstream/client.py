"""The upstream client: the worker's shared pools, and the one table that turns
aiohttp's client exceptions into the gateway's error tree.

Two pools, built once at start-up and closed at shutdown (``app.py``):

* the *inference* pool (``upstream/pool.py``: connections opened by the shared ``TCPConnector``,
  with its aiodns resolver and DNS cache, kept alive and limited there) carries every
  proxied request, written straight onto its connections by ``upstream/protocol.py`` (no
  ``ClientSession`` machinery per request, issue #3's profile);
* a small *control* ``ClientSession`` for model discovery and health checks, so
  discovery never queues behind inference traffic in the inference pool (issue #2).

Both relay rather than browse: no cookie jar (one client's cookies must never reach
another), no automatic decompression (bytes pass through with their
``Content-Encoding``), no automatic ``Accept-Encoding``/``User-Agent``/``Content-Type``
(only what the client sent), and no redirects followed.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
from yarl import URL

from proxy.config.loader import Config
from proxy.errors import (
    DEADLINE_ERRORS,
    ConnectTimeout,
    GatewayError,
    PoolTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.upstream import protocol
from proxy.upstream.deadlines import Deadlines
from proxy.upstream.pool import ConnectionPool, WaitTimeout
from proxy.upstream.protocol import UpstreamProtocol, UpstreamRequest

_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_CONTROL_POOL_LIMIT = 32

# Most specific first (httpx's map_httpcore_exceptions): the first match wins.
_EXCEPTION_TABLE: tuple[tuple[type[BaseException], type[UpstreamError], str], ...] = (
    (aiohttp.ConnectionTimeoutError, UpstreamTimeout, "timed out connecting to upstream"),
    (aiohttp.SocketTimeoutError, UpstreamTimeout, "timed out waiting for upstream to answer"),
    (TimeoutError, UpstreamTimeout, "timed out waiting for upstream"),
    (aiohttp.ClientConnectorCertificateError, UpstreamUnreachable,
     "certificate not trusted for upstream"),
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
    if isinstance(exc, protocol.DeadlineExpired):
        return DEADLINE_ERRORS[exc.key](provider, exc.limit)
    for exc_type, error_type, message in _EXCEPTION_TABLE:
        if isinstance(exc, exc_type):
            detail = _os_detail(exc)
            return error_type(f"{message} '{provider}'{detail}")
    return UpstreamError(f"upstream request failed for '{provider}' ({type(exc).__name__})")


def _os_detail(exc: BaseException) -> str:
    """The OS reason ("connection refused") without the address asyncio puts in
    ``strerror``: the message must name the provider only."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", None)
        return f": {reason}" if reason else ""
    if isinstance(exc, aiohttp.ClientSSLError):
        return ""  # its errno is OpenSSL's, not the OS's
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno:
        return f": {os.strerror(exc.os_error.errno).lower()}"
    return ""


class LimitFollower:
    """Makes the pool follow one adaptive limiter. ``claim()`` puts it in charge of its
    provider's cap (the previous limiter's calls are then ignored); a reload claims only
    once the new gateway is in force, so a build that fails changes nothing."""

    __slots__ = ("_initial", "_pool", "_provider", "_tls", "_url")

    def __init__(self, pool: ConnectionPool, url: URL, tls: ssl.SSLContext | None,
                 provider: str, initial: int):
        self._pool, self._url, self._tls = pool, url, tls
        self._provider, self._initial = provider, initial

    def claim(self) -> None:
        self._pool.claim_limit(self._url, self._tls, self._provider, self, self._initial)

    def __call__(self, limit: int) -> None:
        self._pool.follow_limit(self._url, self._tls, self._provider, limit, self)


class UpstreamClient:
    """Sends upstream requests over the worker's shared pools, each under its
    provider's deadlines (``upstream/deadlines.py``: the global ones, or the provider's own)."""

    def __init__(self, config: Config):
        self._config = config
        self._pool = ConnectionPool(limit=config.pool.limit,
                                    keepalive=config.pool.keepalive_timeout,
                                    connect_timeout=config.timeouts.connect)
        self._default_deadlines = Deadlines.of(config.timeouts)
        self._deadlines = self._providers_deadlines(config)
        self._control: aiohttp.ClientSession | None = None
        self.in_flight = 0

    def use_providers(self, config: Config) -> None:
        """After a reload: the new providers' own deadlines over the running global ones
        (``timeouts`` itself needs a restart); removed ones leave the pool's caps."""
        for name in self._deadlines.keys() - {p.name for p in config.providers}:
            self._pool.forget(name)
        self._deadlines = self._providers_deadlines(config)

    def _providers_deadlines(self, config: Config) -> dict[str, Deadlines]:
        """Each provider's own deadlines over the global ones this client started with."""
        return {p.name: Deadlines.of(self._config.timeouts, p.timeouts)
                for p in config.providers}

    def __repr__(self) -> str:
        state = "open" if self._control else "closed"
        return (f"<UpstreamClient {state} in_flight={self.in_flight} "
                f"pool_limit={self._pool.limit} {self._pool!r}>")

    async def start(self) -> None:
        """Create the pools; called at start-up, inside the worker's event loop."""
        timeouts, pool = self._config.timeouts, self._config.pool
        self._pool.start()
        self._control = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=_CONTROL_POOL_LIMIT, limit_per_host=0, use_dns_cache=True,
                ttl_dns_cache=300, keepalive_timeout=pool.keepalive_timeout,
                resolver=aiohttp.AsyncResolver()),
            timeout=aiohttp.ClientTimeout(total=timeouts.discovery,
                                          sock_connect=timeouts.connect),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO_HEADERS, raise_for_status=False)

    @asynccontextmanager
    async def open(self, request: UpstreamRequest, provider: str
                   ) -> AsyncIterator[protocol.UpstreamResponse]:
        """Send ``request``; yield the response once its head arrived.

        On a normal exit the connection goes back to the pool (or is closed if the
        answer was not read to its end); on any exception, cancellation included (the
        client went away), it is closed, which is what cancels the upstream generation.
        """
        connection, response = await self.send(request, provider)
        try:
            yield response
        except BaseException:
            self.done(connection, reuse=False)
            raise
        self.done(connection, reuse=True)

    def limit_follower(self, url: URL, tls: ssl.SSLContext | None, provider: str,
                       initial: int) -> LimitFollower:
        """The ``on_limit_change`` hook of ``provider``'s new adaptive limiter, starting at
        ``initial``: once claimed, the pool keeps no more connections to its origin than
        the limit allows (issue #3: the shared pool's per-host limit follows the
        adaptive one)."""
        return LimitFollower(self._pool, url, tls, provider, initial)

    def done(self, connection: UpstreamProtocol, *, reuse: bool) -> None:
        """End an exchange begun by :meth:`send`: back to the pool when the answer was
        read to its end and the upstream keeps the connection alive; otherwise dropped,
        which is what cancels an upstream generation."""
        self.in_flight -= 1
        self._pool.release(connection, reuse=reuse)

    async def send(self, request: UpstreamRequest, provider: str
                   ) -> tuple[UpstreamProtocol, protocol.UpstreamResponse]:
        """Send ``request`` and wait for the answer's head; every successful call is
        followed by exactly one :meth:`done`. (The hot path's form of :meth:`open`.)"""
        origin = self._pool.origin(request.url, request.tls)
        payload = protocol.serialize(request, origin.host_header)
        deadlines = self._deadlines.get(provider, self._default_deadlines)
        self.in_flight += 1
        try:
            connection = await self._pool.acquire(origin, deadlines.connect)
        except BaseException as exc:
            self.in_flight -= 1
            if isinstance(exc, WaitTimeout):  # the pool was full
                raise PoolTimeout(provider, deadlines.connect) from exc
            if isinstance(exc, TimeoutError):  # opening it: sock_connect, or what a wait left
                raise ConnectTimeout(provider, deadlines.connect) from exc
            if isinstance(exc, UPSTREAM_EXCEPTIONS):
                raise translate_exception(exc, provider) from exc
            raise
        try:
            response = await connection.request(
                payload, head_only=request.method == "HEAD", deadlines=deadlines)
        except BaseException as exc:
            self.done(connection, reuse=False)
            if isinstance(exc, protocol.HttpProcessingError):
                raise UpstreamProtocolError(
                    f"upstream '{provider}' sent an invalid HTTP answer") from exc
            if isinstance(exc, UPSTREAM_EXCEPTIONS):
                raise translate_exception(exc, provider) from exc
            raise
        return connection, response

    async def get_json(self, url: URL, headers: Mapping[str, str], provider: str,
                       tls: ssl.SSLContext | None = None) -> tuple[int, Any]:
        """A control-plane GET (discovery, health): status and parsed JSON body."""
        if self._control is None:
            raise RuntimeError("UpstreamClient used before start() or after close()")
        try:
            async with self._control.get(url, headers=headers, allow_redirects=True,
                                         ssl=tls if tls is not None else True) as resp:
                body = await resp.read()
        except UPSTREAM_EXCEPTIONS as exc:
            raise translate_exception(exc, provider) from exc
        try:
            return resp.status, orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return resp.status, None

    async def close(self) -> None:
        control, self._control = self._control, None
        if control is not None:
            await control.close()
        await self._pool.close()
