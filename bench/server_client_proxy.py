"""The floor of a proxy on this stack: aiohttp's low-level ``web.Server`` relaying each
request to ``--upstream`` over a bare asyncio keep-alive client.

Why it is in bench/: ``bench/floor_proxy.py`` keeps ``web.Application`` and the gateway's
own upstream client, so it is the floor of the gateway's *design*; this is the floor of
any proxy built on uvloop plus aiohttp's server (issue 11's table, target
``server_client`` in ``bench/compare.py``). The client does the least an HTTP/1.1 relay
can: one ``asyncio.Protocol`` per upstream connection, a small pool of idle connections
(LIFO, so the warm ones are reused), the request written in one ``transport.write``, and
the answer parsed just enough: the status line, ``Content-Length`` and ``Connection``;
the body is the next ``Content-Length`` bytes. No chunked answers (so no streams: the
relay answers 502), no header rules, no timeouts beyond the client's own disconnect
(``handler_cancellation``), which drops the upstream connection mid-answer.

    python -m bench.server_client_proxy --upstream http://127.0.0.1:9000 --port 8085
"""

from __future__ import annotations

import argparse
import asyncio
import re
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import uvloop
from aiohttp import web
from aiohttp.web_request import BaseRequest

IDLE_LIMIT = 256  # idle upstream connections kept, as the nginx target's ``keepalive 256``
_MAX_HEAD = 64 * 1024
_FIELDS = re.compile(rb"\r\n(content-length|connection|content-type):[ \t]*([^\r]*)", re.I)


class UpstreamError(Exception):
    """The upstream closed the connection or sent an answer this client cannot read."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    body: bytes


class UpstreamConn(asyncio.Protocol):
    """One upstream connection carrying one request at a time; the answer is handed to
    the waiting handler through one future."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = self.reusable = False
        self.status, self.length, self.content_type = 0, -1, ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, data: bytes) -> asyncio.Future[Answer]:
        """Write one whole request; the future gets its answer."""
        assert self.transport is not None and self.waiter is None
        self.waiter = asyncio.get_running_loop().create_future()
        self.status, self.length = 0, -1
        self.transport.write(data)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.length < 0 and not self._head():
            return
        if len(self.buf) < self.length:
            return
        body = bytes(self.buf[: self.length])
        del self.buf[: self.length]
        self._settle(Answer(self.status, self.content_type, body), None)

    def _head(self) -> bool:
        """Parse the status line and framing once the head is in; ``False`` until then."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HEAD:
                self._fail(UpstreamError("answer head too long"))
            return False
        head = bytes(self.buf[:end])
        del self.buf[: end + 4]
        fields = {name.lower(): value for name, value in _FIELDS.findall(head)}
        if not head.startswith(b"HTTP/1.1 ") or b"content-length" not in fields:
            self._fail(UpstreamError(f"cannot read {head[:60]!r}: no Content-Length"))
            return False
        self.status, self.length = int(head[9:12]), int(fields[b"content-length"])
        self.content_type = fields.get(b"content-type", b"application/json").decode("latin-1")
        self.reusable = fields.get(b"connection", b"").lower() != b"close"
        return True

    def _settle(self, answer: Answer | None, exc: Exception | None) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            if exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(cast(Answer, answer))

    def _fail(self, exc: Exception) -> None:
        self.reusable = False
        self._settle(None, exc)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed, self.reusable = True, False
        self._settle(None, UpstreamError(f"upstream closed the connection ({exc!r})"))


class Pool:
    """Idle keep-alive connections to one upstream; a new one when none is idle."""

    def __init__(self, upstream: str) -> None:
        url = urlsplit(upstream)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.head_host = url.netloc.encode("latin-1")
        self.idle: list[UpstreamConn] = []

    def __repr__(self) -> str:
        return f"<Pool {self.host}:{self.port} idle={len(self.idle)}/{IDLE_LIMIT}>"

    async def acquire(self) -> UpstreamConn:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
        _, conn = await asyncio.get_running_loop().create_connection(
            UpstreamConn, self.host, self.port)
        return conn

    def release(self, conn: UpstreamConn) -> None:
        """Back to the pool if the answer left it clean; else closed."""
        if conn.reusable and not conn.closed and len(self.idle) < IDLE_LIMIT:
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


def render(pool: Pool, method: str, path: str, body: bytes) -> bytes:
    """Request line, the three headers a JSON POST needs, and the body: one buffer."""
    return b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n" \
           b"Content-Length: %d\r\n\r\n%s" % (method.encode("latin-1"),
                                               path.encode("latin-1"), pool.head_host,
                                               len(body), body)


def relay_handler(pool: Pool) -> web.Server:
    """The server whose one handler relays every request through ``pool``."""
    async def relay(request: BaseRequest) -> web.Response:
        body = await request.read()
        try:
            conn = await pool.acquire()
        except OSError as exc:
            return web.Response(status=502, text=f"upstream unreachable: {exc!r}")
        try:
            answer = await conn.send(render(pool, request.method, request.raw_path, body))
        except UpstreamError as exc:
            pool.release(conn)  # not reusable: closed
            return web.Response(status=502, text=str(exc))
        except BaseException:  # the client went away mid-answer: the connection is dirty
            conn.reusable = False
            pool.release(conn)
            raise
        pool.release(conn)
        return web.Response(status=answer.status, body=answer.body,
                            headers={"Content-Type": answer.content_type})

    return web.Server(relay, handler_cancellation=True, access_log=None)


async def serve(upstream: str, host: str, port: int) -> None:
    """Listen until cancelled; prints one line once listening (as the naive proxy does)."""
    pool = Pool(upstream)
    runner = web.ServerRunner(relay_handler(pool))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"server+client proxy listening on http://{host}:{port} -> {upstream}",
              flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.server_client_proxy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8085)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
