"""Raw HTTP/1.1 against the real gateway, for the HTTP safety tests
(tests/test_http_safety*.py): ``Raw`` is one client connection the test writes bytes to
and reads one reply or the close from (the ``connect`` fixture closes them after the
test), ``one_reply`` sends one request on a fresh connection, ``read_until`` reads what
a peer sends (to a marker, N bytes or its close) bounded in time, and
``recording_upstream`` records every request that got through (the ``safe_gateway``
fixture puts it behind a gateway with the cache off).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from aiohttp import web
from yarl import URL

from tests.wire import CHAT

CHAT_BODY = orjson.dumps(CHAT)


ANSWER = {"id": "chatcmpl-s", "object": "chat.completion", "created": 0, "model": "m",
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": "ok"}}]}


# Generous bounds for a noisy 2-core machine: the limits in these tests are 0.5 s, and
# without the behaviour under test the connection would stay open far beyond these.
SLACK = 5.0


@dataclass
class Recorder:
    """What reached the upstream: every request except discovery's model listings."""

    requests: list[tuple[str, str, bytes]] = field(default_factory=list)
    delay: float = 0.0


def recording_upstream(recorder: Recorder) -> web.Application:
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def anything(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        recorder.requests.append((request.method, request.path_qs, body))
        if not body.startswith(b"{") or not orjson.loads(body).get("stream"):
            await asyncio.sleep(recorder.delay)
            return web.json_response(ANSWER)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(3):  # a slow generation: the whole stream takes 3 x delay
            await asyncio.sleep(recorder.delay)
            await response.write(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


Safe = Callable[..., Awaitable[tuple[str, Recorder]]]


async def read_until(reader: asyncio.StreamReader, marker: bytes | None = None, *,
                     count: int | None = None, within: float = SLACK) -> bytes:
    """What the peer sends up to and including ``marker``, or ``count`` bytes, or (neither
    given) everything until it closes; failing after ``within`` seconds, saying what it
    waited for and, for a close, what had come. Issue 11: a test waits for the bytes it
    needs, never a guessed time for them to arrive. A reset propagates (the caller says
    what a reset means), and so does a close before the marker or the count."""
    if marker is not None or count is not None:
        wanted = reader.readuntil(marker) if marker is not None else reader.readexactly(
            count or 0)
        try:
            return await asyncio.wait_for(wanted, within)
        except TimeoutError:
            raise AssertionError(f"not within {within} s: {marker or count!r}") from None
    received = bytearray()
    try:
        async with asyncio.timeout(within):
            while data := await reader.read(65536):
                received += data
    except TimeoutError:
        raise AssertionError(f"not closed within {within} s; came: "
                             f"{bytes(received)[:300]!r}") from None
    return bytes(received)


def chat_request(extra: bytes = b"", body: bytes = CHAT_BODY) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def code(self) -> str:
        assert self.headers["content-type"].startswith("application/json"), self
        code: str = orjson.loads(self.body)["error"]["code"]
        return code


class Raw:
    """One raw client connection to the gateway (``connect`` closes it after the test)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Raw:
        target = URL(url)
        return cls(*await asyncio.open_connection(target.host, target.port))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, within: float = 10) -> Reply:
        """One response with a Content-Length body."""
        head = await read_until(self.reader, b"\r\n\r\n", within=within)
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (line.partition(":") for line in lines)}
        body = await read_until(self.reader, count=int(headers.get("content-length", "0")),
                                within=within)
        return Reply(int(status_line.split()[1]), headers, body)

    async def closed(self, within: float = SLACK) -> bool:
        """Whether the gateway closes the connection ``within`` seconds (sending nothing
        more before it)."""
        try:
            return await asyncio.wait_for(self.reader.read(1), within) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


Connect = Callable[[str], Awaitable[Raw]]


async def one_reply(url: str, data: bytes) -> Reply:
    client = await Raw.open(url)
    try:
        await client.send(data)
        return await client.reply()
    finally:
        await client.close()
