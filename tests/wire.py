"""A raw HTTP/1.1 upstream for wire-level tests of the upstream hot path (issue #3):
every byte and every close is the test's choice, and it counts the connections it
accepts. Plus small client helpers shared by the ``test_upstream_*`` files."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from yarl import URL

from tests.conftest import MakeConfig, StartGateway

MODELS = orjson.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})
ANSWER = b'{"id":"chatcmpl-w","object":"chat.completion","choices":[]}'
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Request:
    method: str
    target: str
    head: bytes
    headers: list[tuple[str, bytes]]  # names lower-cased, values as raw bytes
    body: bytes

    def values(self, name: str) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One HTTP/1.1 request (head, then a Content-Length body); None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    request_line, *lines = head[:-4].split(b"\r\n")
    method, target, _ = request_line.decode().split(" ", 2)
    headers = [(name.strip().decode().lower(), value.strip())
               for name, _, value in (line.partition(b":") for line in lines)]
    length = int(next((v for k, v in headers if k == "content-length"), b"0"))
    return Request(method, target, head, headers, await reader.readexactly(length))


@dataclass
class Conn:
    """One accepted upstream connection, as a test script sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[Request] = field(default_factory=list)

    async def __aiter__(self) -> AsyncIterator[Request]:
        """The inference requests; discovery's model listings are answered here, each
        on a connection closed after it, so they never count as inference traffic."""
        while (request := await read_request(self.reader)) is not None:
            self.requests.append(request)
            if not request.target.endswith("/models"):
                yield request
                continue
            await self.send(MODELS, extra=b"Connection: close\r\n")
            return

    async def send(self, body: bytes, *, status: bytes = b"200 OK",
                   content_type: bytes = b"application/json", extra: bytes = b"") -> None:
        self.writer.write(b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s"
                          % (status, content_type, len(body), extra, body))
        await self.writer.drain()

    async def send_chunked(self, parts: list[bytes], *, content_type: bytes,
                           end: bool = True) -> None:
        """A chunked answer, each part written (and drained) on its own."""
        self.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n" % content_type)
        for part in parts:
            self.writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await self.writer.drain()
            await asyncio.sleep(0.01)
        if end:
            self.writer.write(b"0\r\n\r\n")
            await self.writer.drain()


Script = Callable[[Conn], Awaitable[None]]


class RawUpstream:
    """A raw HTTP/1.1 server on loopback; ``script`` runs once per accepted connection
    and the connection is closed when it returns."""

    def __init__(self, script: Script):
        self._script = script
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connections: list[Conn] = []
        self.open = self.max_open = 0
        self.url = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"

    @property
    def inference(self) -> list[Conn]:
        """Connections that carried at least one request other than a model listing."""
        return [c for c in self.connections
                if any(not r.target.endswith("/models") for r in c.requests)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        conn = Conn(reader, writer)
        self.connections.append(conn)
        try:
            await self._script(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


StartRaw = Callable[[Script], Awaitable[RawUpstream]]


async def answer_each(conn: Conn) -> None:
    """Keep-alive: answer every request with ``ANSWER`` and Content-Length."""
    async for _ in conn:
        await conn.send(ANSWER)


async def gateway(start_gateway: StartGateway, make_config: MakeConfig, url: str,
                  **raw: Any) -> str:
    provider = {"name": "prov", "type": "openai_compat", "base_url": url, "models": ["m"]}
    return await start_gateway(make_config([provider], **raw))


async def fetch(url: str, method: str = "POST", body: dict[str, Any] | None = None,
                ) -> tuple[int, dict[str, Any], bytes]:
    """Status, headers and whole body of one request (a payload error propagates)."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.request(
            method, url, json=body if method == "POST" else None) as response:
        return response.status, dict(response.headers), await response.read()


Reply = tuple[int, "dict[str, str]", bytes]


async def post_json(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Reply:
    """One POST on a shared session (its connection pool is the test's to size)."""
    async with session.post(url, data=orjson.dumps(body),
                            headers={"Content-Type": "application/json"}) as response:
        return response.status, dict(response.headers), await response.read()


def error_code(body: bytes) -> str:
    """The ``code`` of an OpenAI-shaped error body or of a stream's SSE error event."""
    _, marker, rest = body.partition(b"event: error\ndata: ")
    payload = rest.split(b"\n", 1)[0] if marker else body
    code: str = orjson.loads(payload)["error"]["code"]
    return code


async def raw_call(url: str, head: bytes, body: bytes = b"") -> bytes:
    """A hand-made request to the gateway (aiohttp's client would re-encode headers)."""
    target = URL(url)
    reader, writer = await asyncio.open_connection(target.host, target.port)
    try:
        writer.write(head + body)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


@asynccontextmanager
async def raw_servers() -> AsyncIterator[StartRaw]:
    """``start(script)`` starts a ``RawUpstream``; all are closed on exit."""
    servers: list[RawUpstream] = []

    async def start(script: Script) -> RawUpstream:
        server = RawUpstream(script)
        await server.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.close()
