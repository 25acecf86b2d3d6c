"""The upstream hot path on the wire (issue #3, "Hot path"): ``http1.py`` writes requests
straight onto the shared ``TCPConnector``'s connections, and "must pass the same tests as
ClientSession would (content-length and chunked answers, keep-alive reuse, a connection
the upstream closed, timeouts, TLS upstreams), and stay the one shared, limited pool".

The upstreams are raw asyncio servers (``tests/wire.py``), so every byte and every close
is the test's choice. Timeouts: test_upstream_timeouts.py; the pool and the C parser:
test_upstream_pool.py; TLS: test_upstream_tls.py.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from tests.conftest import MakeConfig, StartGateway
from tests.polling import until
from tests.wire import (
    ANSWER,
    CHAT,
    Conn,
    Request,
    StartRaw,
    answer_each,
    error_code,
    fetch,
    gateway,
    raw_call,
)

SSE_PARTS = [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', b'data: {"n":3}\n\n',
             b"data: [DONE]\n\n"]
JSON_PARTS = [b'{"id":"chatcmpl-w",', b'"object":"chat.completion",', b'"choices":[]}']


@pytest.mark.parametrize("framing", ["length", "chunked", "chunked-sse"])
async def test_answers_are_relayed_intact(framing: str, raw_upstream: StartRaw,
                                          start_gateway: StartGateway,
                                          make_config: MakeConfig) -> None:
    sse = framing.endswith("sse")
    parts = SSE_PARTS if sse else JSON_PARTS
    content_type = b"text/event-stream" if sse else b"application/json"

    async def script(conn: Conn) -> None:
        async for _ in conn:
            if framing == "length":
                await conn.send(b"".join(parts))
            else:
                await conn.send_chunked(parts, content_type=content_type)

    upstream = await raw_upstream(script)
    url = await gateway(start_gateway, make_config, upstream.url)
    status, headers, body = await fetch(f"{url}/v1/chat/completions", body={**CHAT, "stream": sse})
    assert (status, body) == (200, b"".join(parts))
    assert headers["Content-Type"] == content_type.decode()
    if framing == "length":
        assert headers["Content-Length"] == str(len(body))


BIG_PART = b'{"pad":"' + b"x" * 600_000  # past any "small answer" buffering


@pytest.mark.parametrize("kind", ["sse", "big-json"])
async def test_chunked_answer_cut_after_the_status_was_sent(
        kind: str, raw_upstream: StartRaw, start_gateway: StartGateway,
        make_config: MakeConfig) -> None:
    """The upstream closes before the terminating chunk, once the client has the status
    and what was sent so far: the truncated answer must not look complete."""
    sse = kind == "sse"
    parts = SSE_PARTS[:2] if sse else [BIG_PART]
    received = asyncio.Event()

    async def script(conn: Conn) -> None:
        async for _ in conn:
            content_type = b"text/event-stream" if sse else b"application/json"
            await conn.send_chunked(parts, content_type=content_type, end=False)
            await asyncio.wait_for(received.wait(), 5)
            return  # closed without the 0-size chunk

    upstream = await raw_upstream(script)
    url = await gateway(start_gateway, make_config, upstream.url)
    sent = b"".join(parts)
    async with aiohttp.ClientSession() as http, http.post(
            f"{url}/v1/chat/completions", json={**CHAT, "stream": sse}) as response:
        assert response.status == 200
        body = await asyncio.wait_for(response.content.readexactly(len(sent) if sse else 1), 5)
        received.set()
        if not sse:
            with pytest.raises(aiohttp.ClientPayloadError):
                await asyncio.wait_for(response.read(), 5)
            return
        body += await asyncio.wait_for(response.read(), 5)
    assert body.startswith(sent + b"event: error\n")
    assert b"[DONE]" not in body
    assert error_code(body) == "upstream_protocol_error"


async def test_json_answer_cut_early_never_looks_complete(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    """A small non-stream answer is held back until complete (``streaming.py``), so a
    cut one becomes a clean 502."""
    async def script(conn: Conn) -> None:
        async for _ in conn:
            await conn.send_chunked(JSON_PARTS[:2], content_type=b"application/json",
                                    end=False)
            return

    upstream = await raw_upstream(script)
    url = await gateway(start_gateway, make_config, upstream.url)
    try:
        status, _, body = await fetch(f"{url}/v1/chat/completions", body=CHAT)
    except aiohttp.ClientPayloadError:
        return  # a gateway that sent the status early must break the body: also fine
    assert (status, error_code(body)) == (502, "upstream_protocol_error")


async def test_keep_alive_one_connection_for_20_requests(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    upstream = await raw_upstream(answer_each)
    url = await gateway(start_gateway, make_config, upstream.url)
    for _ in range(20):
        status, _, body = await fetch(f"{url}/v1/chat/completions", body=CHAT)
        assert (status, body) == (200, ANSWER)
    assert len(upstream.inference) == 1
    assert len(upstream.inference[0].requests) == 20


async def test_upstream_connection_close_opens_a_new_connection(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    async def script(conn: Conn) -> None:
        async for _ in conn:
            await conn.send(ANSWER, extra=b"Connection: close\r\n")
            return

    upstream = await raw_upstream(script)
    url = await gateway(start_gateway, make_config, upstream.url)
    for _ in range(3):
        status, _, body = await fetch(f"{url}/v1/chat/completions", body=CHAT)
        assert (status, body) == (200, ANSWER)
    assert [len(c.requests) for c in upstream.inference] == [1, 1, 1]


async def test_idle_connection_closed_by_upstream_is_not_reused(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    async def script(conn: Conn) -> None:
        async for _ in conn:
            await conn.send(ANSWER)  # keep-alive by default in HTTP/1.1 ...
            await asyncio.sleep(0.1)
            return  # ... but closed while idle in the gateway's pool

    upstream = await raw_upstream(script)
    url = await gateway(start_gateway, make_config, upstream.url)
    for _ in range(2):
        status, _, body = await fetch(f"{url}/v1/chat/completions", body=CHAT)
        assert (status, body) == (200, ANSWER)
        await until(lambda: upstream.open == 0, what="the upstream closing its idle connection")
    assert [len(c.requests) for c in upstream.inference] == [1, 1]


async def test_upstream_closing_without_answer_is_502_and_gateway_goes_on(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    seen: list[Request] = []

    async def script(conn: Conn) -> None:
        async for request in conn:
            seen.append(request)
            if len(seen) == 1:
                return  # read the request, close without a word
            await conn.send(ANSWER)

    upstream = await raw_upstream(script)
    url = await gateway(start_gateway, make_config, upstream.url)
    status, _, body = await fetch(f"{url}/v1/chat/completions", body=CHAT)
    assert status == 502
    assert error_code(body) in ("upstream_unreachable", "upstream_protocol_error")
    assert upstream.url.split("//")[1].split("/")[0] not in body.decode()
    for _ in range(2):
        assert (await fetch(f"{url}/v1/chat/completions", body=CHAT))[::2] == (200, ANSWER)
    assert len(seen) == 3


@pytest.mark.parametrize("interim", [b"100 Continue\r\n", b"103 Early Hints\r\nLink: </a>\r\n"])
async def test_interim_1xx_answers_are_skipped(interim: bytes, raw_upstream: StartRaw,
                                               start_gateway: StartGateway,
                                               make_config: MakeConfig) -> None:
    async def script(conn: Conn) -> None:
        async for _ in conn:
            conn.writer.write(b"HTTP/1.1 " + interim + b"\r\n")
            await conn.writer.drain()
            await asyncio.sleep(0.05)
            await conn.send(ANSWER, extra=b"X-Final: yes\r\n")

    upstream = await raw_upstream(script)
    url = await gateway(start_gateway, make_config, upstream.url)
    for _ in range(2):  # and the connection is still good for the next request
        status, headers, body = await fetch(f"{url}/v1/chat/completions", body=CHAT)
        assert (status, body, headers["X-Final"]) == (200, ANSWER, "yes")
        assert "Link" not in headers
    assert len(upstream.inference) == 1


async def test_head_request_does_not_wait_for_a_body(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    async def script(conn: Conn) -> None:
        async for request in conn:
            if request.method == "HEAD":  # the length of the body a GET would get
                conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n"
                                  b"X-Files: 3\r\n\r\n")
            else:
                await conn.send(ANSWER)

    upstream = await raw_upstream(script)
    url = await gateway(start_gateway, make_config, upstream.url)
    started = time.perf_counter()
    status, headers, body = await asyncio.wait_for(fetch(f"{url}/v1/files", "HEAD"), 3)
    assert (status, headers["X-Files"], body) == (200, "3", b"")
    assert time.perf_counter() - started < 1.0
    status, _, body = await fetch(f"{url}/v1/files", "GET")
    assert (status, body) == (200, ANSWER)
    assert [r.method for r in upstream.inference[0].requests] == ["HEAD", "GET"]


async def test_request_head_and_body_as_the_upstream_sees_them(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    upstream = await raw_upstream(answer_each)
    url = await gateway(start_gateway, make_config, upstream.url)
    body = '{"model": "m",  "messages": [{"role":"user","content":"h\\u00e9 ✓"}]}'.encode()
    head = (b"POST /v1/chat/completions?x=%%7E1 HTTP/1.1\r\nHost: gw.example\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n"
            b"X-Note: caf\xc3\xa9 \xe2\x9c\x93\r\nX-Latin: \xe9t\xe9\r\n"
            b"X-Twice: a\r\nX-Twice: b\r\n"
            b"Connection: close\r\n\r\n" % len(body))
    answer = await raw_call(url, head, body)
    assert answer.startswith(b"HTTP/1.1 200 ")
    [request] = [r for c in upstream.inference for r in c.requests]
    assert request.head.startswith(b"POST /v1/chat/completions?x=%7E1 HTTP/1.1\r\n")
    assert request.head.count(b"HTTP/1.1") == 1
    assert request.values("host") == [upstream.url.split("/")[2].encode()]
    assert request.values("content-length") == [str(len(body)).encode()]
    assert request.values("x-note") == ["café ✓".encode()]
    assert request.values("x-latin") == [b"\xe9t\xe9"]  # not UTF-8: bytes kept as sent
    assert request.values("x-twice") == [b"a", b"b"]
    assert request.values("content-type") == [b"application/json"]
    assert request.values("connection") == request.values("transfer-encoding") == []
    names = [name for name, _ in request.headers if name != "x-twice"]
    assert len(names) == len(set(names)), names
    assert request.body == body


async def test_chunked_client_body_goes_up_with_content_length(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    upstream = await raw_upstream(answer_each)
    url = await gateway(start_gateway, make_config, upstream.url)
    body = orjson.dumps(CHAT)
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json"
            b"\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    chunked = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (10, body[:10], len(body) - 10, body[10:])
    assert (await raw_call(url, head, chunked)).startswith(b"HTTP/1.1 200 ")
    [request] = [r for c in upstream.inference for r in c.requests]
    assert request.values("content-length") == [str(len(body)).encode()]
    assert request.values("transfer-encoding") == []
    assert request.body == body


async def test_get_without_body_has_no_content_length(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    upstream = await raw_upstream(answer_each)
    url = await gateway(start_gateway, make_config, upstream.url)
    assert (await fetch(f"{url}/v1/files?purpose=batch", "GET"))[0] == 200
    [request] = [r for c in upstream.inference for r in c.requests]
    assert request.head.startswith(b"GET /v1/files?purpose=batch HTTP/1.1\r\n")
    assert request.values("content-length") == request.values("transfer-encoding") == []
    assert request.body == b""
