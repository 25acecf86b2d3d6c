"""Client-side limits and timeouts (issue #4, "Request limits and HTTP safety"), each
exercised with raw sockets against the real gateway and a real upstream that records
every request it gets: 431 for an oversized head, 413 for a chunked body over the limit,
a trickled head dropped, a stalled or trickled body answered 408, idle keep-alive
connections closed, connections over ``server.max_connections`` answered 503, and a
slow upstream never cut by any of these. Request smuggling: test_http_safety_smuggling.py;
the configuration keys: test_http_safety_config.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import orjson

from tests.polling import until
from tests.raw_http import (
    CHAT_BODY,
    SLACK,
    Connect,
    Raw,
    Reply,
    Safe,
    chat_request,
    one_reply,
    read_until,
)
from tests.wire import CHAT, post_json


def header_lines(count: int, size: int) -> bytes:
    """``count`` header lines of ``size`` bytes each, CRLF included."""
    return b"".join(b"X-Pad-%03d: %s\r\n" % (i, b"a" * (size - 13)) for i in range(count))


# --- head size ---------------------------------------------------------------------------

async def test_a_header_line_over_the_limit_gets_431(safe_gateway: Safe,
                                                     connect: Connect) -> None:
    url, upstream = await safe_gateway(max_header_bytes=4096)
    client = await connect(url)
    await client.send(chat_request(b"X-Big: " + b"a" * 5000 + b"\r\n"))
    reply = await client.reply()
    assert (reply.status, reply.code()) == (431, "request_headers_too_large")
    assert reply.headers["connection"] == "close" and await client.closed()
    assert b"aaaa" not in reply.body  # the client's bytes are not echoed
    assert upstream.requests == []
    assert (await one_reply(url, chat_request())).status == 200


async def test_many_lines_over_the_limit_in_pieces_get_431(safe_gateway: Safe,
                                                     connect: Connect) -> None:
    """Each line is well under the limit: only the total counts, while the head is still
    arriving (no head is ever buffered beyond the limit)."""
    url, upstream = await safe_gateway(max_header_bytes=4096)
    client = await connect(url)
    head = chat_request(header_lines(60, 100))
    for start in range(0, 5000, 1000):  # past the limit, and far from the head's end
        await client.send(head[start:start + 1000])
        await asyncio.sleep(0.02)
    reply = await client.reply()
    assert (reply.status, reply.code()) == (431, "request_headers_too_large")
    assert upstream.requests == []


async def test_a_whole_head_over_the_limit_in_one_write_gets_431(safe_gateway: Safe) -> None:
    url, upstream = await safe_gateway(max_header_bytes=4096)
    reply = await one_reply(url, chat_request(header_lines(45, 100)))
    assert (reply.status, reply.code()) == (431, "request_headers_too_large")
    assert upstream.requests == []


async def test_a_head_just_under_the_limit_passes(safe_gateway: Safe) -> None:
    url, upstream = await safe_gateway(max_header_bytes=4096)
    head = chat_request(header_lines(36, 100))
    assert len(head) - len(CHAT_BODY) < 4096
    assert (await one_reply(url, head)).status == 200
    assert len(upstream.requests) == 1


async def test_too_many_header_fields_get_431(safe_gateway: Safe) -> None:
    url, upstream = await safe_gateway()
    reply = await one_reply(url, chat_request(header_lines(130, 20)))
    assert (reply.status, reply.code()) == (431, "request_headers_too_large")
    assert upstream.requests == []


# --- body size ---------------------------------------------------------------------------

async def test_a_chunked_body_over_max_body_bytes_gets_413(safe_gateway: Safe) -> None:
    """No Content-Length to refuse up front: the limit holds while the chunks arrive."""
    url, upstream = await safe_gateway(max_body_bytes=1000)
    body = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]})
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                      for part in (body[i:i + 600] for i in range(0, len(body), 600)))
    reply = await one_reply(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                            b"Content-Type: application/json\r\nTransfer-Encoding: chunked"
                            b"\r\n\r\n" + chunks + b"0\r\n\r\n")
    assert (reply.status, reply.code()) == (413, "request_too_large")
    assert upstream.requests == []


# --- timeouts ----------------------------------------------------------------------------

@asynccontextmanager
async def trickling(client: Raw, data: bytes, interval: float = 0.05) -> AsyncIterator[None]:
    """Send ``data`` a byte at a time in the background (until the gateway closes)."""
    async def write() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in data:
                await client.send(bytes([byte]))
                await asyncio.sleep(interval)

    task = asyncio.create_task(write())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_head_trickled_a_byte_at_a_time_is_dropped(safe_gateway: Safe,
                                                     connect: Connect) -> None:
    url, upstream = await safe_gateway(header_timeout=0.5)
    client = await connect(url)
    started = time.monotonic()
    async with trickling(client, chat_request(header_lines(40, 100))):  # 200 s of it
        assert await client.closed()
    assert time.monotonic() - started >= 0.4
    assert upstream.requests == []
    assert (await one_reply(url, chat_request())).status == 200


async def test_a_connection_that_sends_nothing_is_dropped(safe_gateway: Safe,
                                                     connect: Connect) -> None:
    url, _ = await safe_gateway(header_timeout=0.5)
    client = await connect(url)
    assert await client.closed()


async def test_a_stalled_body_gets_408(safe_gateway: Safe,
                                                     connect: Connect) -> None:
    url, upstream = await safe_gateway(body_timeout=0.5)
    client = await connect(url)
    await client.send(chat_request()[:-10])  # the head and all but 10 bytes of the body
    reply = await client.reply(within=SLACK)
    assert (reply.status, reply.code()) == (408, "request_timeout")
    assert reply.headers["connection"] == "close" and await client.closed()
    assert upstream.requests == []


async def test_a_trickled_body_gets_408(safe_gateway: Safe,
                                                     connect: Connect) -> None:
    url, upstream = await safe_gateway(body_timeout=0.5)
    client = await connect(url)
    request = chat_request(body=orjson.dumps({**CHAT, "user": "u" * 4000}))
    head_end = request.index(b"\r\n\r\n") + 4
    await client.send(request[:head_end])
    started = time.monotonic()
    async with trickling(client, request[head_end:]):  # 200 s of it
        reply = await client.reply(within=SLACK)
    assert time.monotonic() - started >= 0.4
    assert (reply.status, reply.code()) == (408, "request_timeout")
    assert upstream.requests == []


async def test_a_slow_upstream_is_never_cut_by_client_timeouts(safe_gateway: Safe) -> None:
    """The client timeouts bound only what the client sends: a generation that takes
    three times as long as all of them, buffered or streamed, is answered whole."""
    url, upstream = await safe_gateway(delay=0.6, header_timeout=0.5, body_timeout=0.5,
                                       keepalive_timeout=0.5)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        status, _, body = await post_json(session, f"{url}/v1/chat/completions", CHAT)
        assert status == 200 and orjson.loads(body)["id"] == "chatcmpl-s"
        status, _, body = await post_json(session, f"{url}/v1/chat/completions",
                                          {**CHAT, "stream": True})
        assert status == 200 and body.count(b"data: ") == 4
        assert body.endswith(b"data: [DONE]\n\n")
    assert len(upstream.requests) == 2


async def test_bytes_after_a_body_never_cut_its_answer(safe_gateway: Safe,
                                                      connect: Connect) -> None:
    """A stray CRLF after a body (old clients send one) starts the head clock while a
    1.8 s stream is being answered: the clock starts over rather than cut the stream."""
    url, upstream = await safe_gateway(delay=0.6, header_timeout=0.5)
    client = await connect(url)
    await client.send(chat_request(body=orjson.dumps({**CHAT, "stream": True})))
    await until(lambda: upstream.requests, what="the stream being answered")
    await client.send(b"\r\n")
    stream = await read_until(client.reader, b"data: [DONE]\n\n")
    assert stream.startswith(b"HTTP/1.1 200 ") and stream.count(b"data: ") == 4


async def test_an_idle_keepalive_connection_is_closed(safe_gateway: Safe,
                                                     connect: Connect) -> None:
    url, upstream = await safe_gateway(keepalive_timeout=0.5, header_timeout=30)
    client = await connect(url)
    await client.send(chat_request())
    assert (await client.reply()).status == 200
    await asyncio.sleep(0.1)
    await client.send(chat_request())  # still open well within the timeout
    assert (await client.reply()).status == 200
    started = time.monotonic()
    assert await client.closed()
    assert 0.4 <= time.monotonic() - started < SLACK
    assert len(upstream.requests) == 2


# --- connections -------------------------------------------------------------------------

async def test_connections_over_max_connections_get_503(safe_gateway: Safe,
                                                     connect: Connect) -> None:
    url, upstream = await safe_gateway(max_connections=2)
    first, second = await connect(url), await connect(url)
    for client in (first, second):
        await client.send(chat_request())
        assert (await client.reply()).status == 200

    third = await connect(url)
    await third.send(chat_request())
    reply = await third.reply()
    assert (reply.status, reply.code()) == (503, "too_many_connections")
    assert reply.headers["retry-after"] == "1" and reply.headers["connection"] == "close"
    assert await third.closed()
    assert len(upstream.requests) == 2

    await first.send(chat_request())  # the open ones keep working
    assert (await first.reply()).status == 200
    await first.close()
    assert (await until_admitted(url)).status == 200  # a slot came back
    await second.close()
    for client in [await connect(url), await connect(url)]:  # both slots came back
        await client.send(chat_request())
        assert (await client.reply()).status == 200


async def until_admitted(url: str) -> Reply:
    """The server learns of a close asynchronously: retry briefly while it is refused."""
    deadline = time.monotonic() + SLACK
    while (reply := await one_reply(url, chat_request())).status == 503:
        assert time.monotonic() < deadline, "the closed connection's slot never came back"
        await asyncio.sleep(0.05)
    return reply
