"""The worker's one shared, limited pool of upstream connections.

Connections are opened by the shared ``aiohttp.TCPConnector`` (aiodns resolver and DNS
cache, happy eyeballs, TLS) and leased for their whole life (``upstream/protocol.py`` says why).
This pool keeps what a connector's pool would: the limit on open connections across all
origins, a FIFO of requests waiting for one (each at most its connect deadline), and per
origin a stack of idle keep-alive connections that close after ``keepalive`` seconds
unused. It hands a connection given back straight to a waiter for the same origin, so a
waiter never needs a new one while an idle one exists.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

import aiohttp
from yarl import URL

from proxy.upstream import protocol
from proxy.upstream.protocol import Origin, UpstreamProtocol

OriginKey = tuple[str, str | None, int | None, int]


class WaitTimeout(TimeoutError):
    """At the limit, no connection became free within the connect deadline: this
    worker's pool was full, the upstream was never asked (httpx's ``PoolTimeout``)."""


class ConnectionPool:
    def __init__(self, *, limit: int, keepalive: float, connect_timeout: float):
        self.limit = limit
        self._keepalive = keepalive
        self._default_connect = connect_timeout
        self._connect_timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout)
        self._connector: aiohttp.TCPConnector | None = None
        self._origins: dict[OriginKey, Origin] = {}
        self._cap_owners: dict[str, object] = {}  # provider -> the limiter that sets its cap
        self._waiters: deque[tuple[Origin, asyncio.Future[UpstreamProtocol | None]]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self.open = 0  # leased connections, and those being opened

    def __repr__(self) -> str:
        state = "open" if self._connector else "closed"
        idle = sum(len(o.idle) for o in self._origins.values())
        return (f"<ConnectionPool {state} open={self.open} idle={idle} "
                f"waiting={len(self._waiters)} limit={self.limit}>")

    def start(self) -> None:
        """Create the connector; at start-up, inside the worker's event loop. Its own limit
        equals ours (a safety net: every connection it opens is leased here)."""
        self._connector = aiohttp.TCPConnector(
            limit=self.limit, limit_per_host=0, use_dns_cache=True, ttl_dns_cache=300,
            keepalive_timeout=self._keepalive, resolver=aiohttp.AsyncResolver())

    def origin(self, url: URL, tls: ssl.SSLContext | None) -> Origin:
        key = (url.scheme, url.raw_host, url.port, id(tls))
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = protocol.origin_of(url, tls)
        return origin

    async def acquire(self, origin: Origin, connect_timeout: float | None = None
                      ) -> UpstreamProtocol:
        """An idle connection to ``origin``, else a new one (opened within
        ``connect_timeout``, else the pool's), else, at the limit, one given back
        (``_wait``). Raises aiohttp's connection errors, ``TimeoutError`` when opening
        took too long and :class:`WaitTimeout` when no connection became free."""
        connection = self._idle(origin)
        if connection is not None:
            return connection
        if self.open < self.limit or self._close_an_idle_one():
            return await self._lease(origin, connect_timeout)
        return await self._wait(origin, connect_timeout)

    async def _wait(self, origin: Origin, connect_timeout: float | None) -> UpstreamProtocol:
        """At the limit: the next connection given back, or a new one once a slot is
        free, waiting and opening together within the connect deadline, so a full pool
        fails a request instead of holding it forever (nothing hangs). The wait is the
        slow path: only it arms a timer."""
        limit = self._default_connect if connect_timeout is None else connect_timeout
        waiting, front = True, False
        try:
            async with asyncio.timeout(limit):
                while True:
                    waiting = True
                    handed = await self._given_back(origin, front=front)
                    # a newcomer may take the slot first: then queue again, at the front
                    waiting, front = False, True
                    if handed is not None:
                        return handed
                    connection = self._idle(origin)
                    if connection is not None:
                        return connection
                    if self.open < self.limit or self._close_an_idle_one():
                        return await self._lease(origin, connect_timeout)
        except TimeoutError as exc:
            if waiting:
                raise WaitTimeout(f"no upstream connection free within {limit:g} s") from exc
            raise

    async def _given_back(self, origin: Origin, *, front: bool) -> UpstreamProtocol | None:
        """Queue for the next connection given back (None: a free slot). A waiter that
        leaves early (its deadline, its client gone) leaves the queue, and passes on
        what was handed to it at that same moment: no connection, no slot is lost."""
        waiter: asyncio.Future[UpstreamProtocol | None] = (
            asyncio.get_running_loop().create_future())
        entry = (origin, waiter)
        if front:
            self._waiters.appendleft(entry)
        else:
            self._waiters.append(entry)
        try:
            return await waiter
        except BaseException:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                given = waiter.result()
                if given is not None:
                    self.release(given, reuse=True)
                elif self.open < self.limit:
                    self._slot_freed()
            raise

    def release(self, connection: UpstreamProtocol, *, reuse: bool) -> None:
        """Take a connection back after an exchange: to a waiter, to the idle stack, or
        closed (an answer not read to its end; the upstream asked to close)."""
        if not (reuse and connection.exchange_done()) or self._connector is None:
            connection.abort()
            return
        while self._waiters:
            wanted, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            if connection.origin is wanted:
                waiter.set_result(connection)
                return
            # Its slot goes to the waiter once it is closed: abort, as a graceful TLS
            # close would hold the slot until the peer's close_notify (up to 30 s).
            connection.abort()
            self._waiters.appendleft((wanted, waiter))
            return
        origin = connection.origin
        assert origin is not None
        if origin.cap and origin.open > origin.cap:
            connection.close()  # the providers' limits shrank: fewer connections kept
            return
        connection.idle_since = connection.loop_time()
        origin.idle.append(connection)
        if self._sweeper is None:
            self._schedule_sweep()

    def forget(self, provider: str) -> None:
        """A provider a reload removed: its cap no longer counts on any origin."""
        self._cap_owners.pop(provider, None)
        for origin in self._origins.values():
            if origin.caps.pop(provider, None) is not None:
                origin.cap = sum(origin.caps.values())

    def claim_limit(self, url: URL, tls: ssl.SSLContext | None, provider: str,
                    owner: object, limit: int) -> None:
        """A new limiter for ``provider`` (start-up, or a reload that changed it): only
        its ``follow_limit`` calls count from now on, the old one's are ignored, and the
        provider's cap leaves an origin it no longer uses (a changed ``base_url``)."""
        self.forget(provider)
        self._cap_owners[provider] = owner
        self.follow_limit(url, tls, provider, limit, owner)

    def follow_limit(self, url: URL, tls: ssl.SSLContext | None, provider: str, limit: int,
                     owner: object) -> None:
        """The adaptive limit of ``provider`` changed (``AdaptiveLimiter.on_limit_change``):
        the origin keeps at most the sum of its providers' limits open, closing idle
        connections over it now and busy ones as they come back."""
        if self._cap_owners.get(provider) is not owner:
            return  # a limiter a reload replaced, still releasing its last requests
        origin = self.origin(url, tls)
        origin.caps[provider] = limit
        origin.cap = sum(origin.caps.values())
        excess = origin.open - origin.cap
        while excess > 0 and origin.idle:
            origin.idle.pop(0).close()
            excess -= 1

    async def close(self) -> None:
        connector, self._connector = self._connector, None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for origin in self._origins.values():
            for connection in origin.idle:
                connection.close()
            origin.idle.clear()
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(aiohttp.ClientConnectionError("the pool is closed"))
        if connector is not None:
            await connector.close()

    def _idle(self, origin: Origin) -> UpstreamProtocol | None:
        """The most recently used live idle connection (the others age out); stale ones
        met on the way are closed."""
        idle = origin.idle
        if not idle:
            return None
        connection = idle.pop()
        oldest_allowed = connection.loop_time() - self._keepalive
        while True:
            if _keepable(connection, oldest_allowed):
                return connection
            connection.close()
            if not idle:
                return None
            connection = idle.pop()

    def _close_an_idle_one(self) -> bool:
        """At the limit, an idle connection to another origin gives way to a new one."""
        for origin in self._origins.values():
            if origin.idle:
                origin.idle.pop(0).abort()  # idle: nothing to flush; free the slot now
                return True
        return False

    async def _lease(self, origin: Origin, connect_timeout: float | None) -> UpstreamProtocol:
        if self._connector is None:  # closed at shutdown under a waiter: a 502, not a 500
            raise aiohttp.ClientConnectionError("the upstream pool is closed")
        self.open += 1
        origin.open += 1

        def closed() -> None:
            origin.open -= 1
            self._connection_closed()

        try:
            timeout = self._connect_timeout
            if connect_timeout is not None and connect_timeout != timeout.sock_connect:
                timeout = aiohttp.ClientTimeout(total=None, connect=None,
                                                sock_connect=connect_timeout)
            lease = await self._connector.connect(origin.template, [], timeout)
            connection = UpstreamProtocol.take_over(lease, closed)
        except BaseException:
            closed()
            raise
        connection.origin = origin
        return connection

    def _connection_closed(self) -> None:
        """A leased connection is gone: its slot goes to the first waiter."""
        self.open -= 1
        self._slot_freed()

    def _slot_freed(self) -> None:
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _schedule_sweep(self) -> None:
        self._sweeper = asyncio.get_running_loop().call_later(self._keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than ``keepalive``."""
        self._sweeper = None
        oldest_allowed = asyncio.get_running_loop().time() - self._keepalive
        for origin in self._origins.values():
            keep = [c for c in origin.idle if _keepable(c, oldest_allowed)]
            for connection in origin.idle:
                if connection not in keep:
                    connection.close()
            origin.idle[:] = keep
        if any(origin.idle for origin in self._origins.values()):
            self._schedule_sweep()


def _keepable(connection: UpstreamProtocol, oldest_allowed: float) -> bool:
    """Still worth keeping: alive, reusable, and idle since after ``oldest_allowed``."""
    return connection.reusable and connection.idle_since > oldest_allowed
