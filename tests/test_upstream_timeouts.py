"""Connect and read timeouts on the upstream hot path (issue #3: "Whatever you choose must
pass the same tests as ClientSession would (... timeouts ...)"). ``timeouts.read`` bounds
each silence, headers included, never the whole answer (STYLE.md point 10: "long
generations are bounded by a read timeout, not a total one")."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import MakeConfig, StartGateway
from tests.wire import CHAT, Conn, StartRaw, error_code, fetch, gateway

READ = 0.5
FAST = {"connect": READ, "read": READ}


async def silent_after_request(conn: Conn) -> None:
    async for _ in conn:
        await conn.reader.read()  # nothing more until the gateway gives up and closes
        return


async def test_connect_timeout_is_504(unanswered_port: int, start_gateway: StartGateway,
                                      make_config: MakeConfig) -> None:
    url = await gateway(start_gateway, make_config, f"http://127.0.0.1:{unanswered_port}/v1",
                        timeouts=FAST)
    started = time.perf_counter()
    status, _, body = await fetch(f"{url}/v1/chat/completions", body=CHAT)
    elapsed = time.perf_counter() - started
    assert (status, error_code(body)) == (504, "connect_timeout")
    assert READ * 0.8 < elapsed < READ + 1.5
    assert str(unanswered_port) not in body.decode()


async def test_read_timeout_before_the_head_is_504(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    upstream = await raw_upstream(silent_after_request)
    url = await gateway(start_gateway, make_config, upstream.url, timeouts=FAST)
    for _ in range(2):  # the timed-out connection is not reused for the second
        started = time.perf_counter()
        status, _, body = await fetch(f"{url}/v1/chat/completions", body=CHAT)
        elapsed = time.perf_counter() - started
        assert (status, error_code(body)) == (504, "upstream_headers_timeout")
        assert READ * 0.8 < elapsed < READ + 1.5
    assert [len(c.requests) for c in upstream.inference] == [1, 1]


@pytest.mark.parametrize("sse", [True, False])
async def test_read_timeout_mid_body(sse: bool, raw_upstream: StartRaw,
                                     start_gateway: StartGateway,
                                     make_config: MakeConfig) -> None:
    first = b'data: {"n":1}\n\n' if sse else b'{"id":"chatcmpl-w",'

    async def script(conn: Conn) -> None:
        async for _ in conn:
            content_type = b"text/event-stream" if sse else b"application/json"
            await conn.send_chunked([first], content_type=content_type, end=False)
            await conn.reader.read()
            return

    upstream = await raw_upstream(script)
    url = await gateway(start_gateway, make_config, upstream.url, timeouts=FAST)
    started = time.perf_counter()
    status, _, body = await fetch(f"{url}/v1/chat/completions", body={**CHAT, "stream": sse})
    elapsed = time.perf_counter() - started
    assert error_code(body) == "stream_stalled"
    assert READ * 0.8 < elapsed < READ + 1.5
    if sse:  # the status was out with the first event: the error is an SSE event
        assert status == 200
        assert body.startswith(first + b"event: error\n")
        assert b"[DONE]" not in body
    else:  # nothing was sent yet: a clean error status
        assert status == 504


async def test_read_timeout_bounds_silence_not_the_whole_stream(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    events = [b'data: {"n":%d}\n\n' % n for n in range(6)]

    async def script(conn: Conn) -> None:
        async for _ in conn:
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
            for event in [*events, b"data: [DONE]\n\n"]:
                await asyncio.sleep(0.3)  # 2.1 s in all, each gap well under READ
                conn.writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await conn.writer.drain()
            conn.writer.write(b"0\r\n\r\n")
            await conn.writer.drain()

    upstream = await raw_upstream(script)
    url = await gateway(start_gateway, make_config, upstream.url, timeouts=FAST)
    started = time.perf_counter()
    status, _, body = await fetch(f"{url}/v1/chat/completions", body={**CHAT, "stream": True})
    assert time.perf_counter() - started > 1.8
    assert (status, body) == (200, b"".join(events) + b"data: [DONE]\n\n")
