"""Streaming through the gateway, timed and byte-exact, and every way a stream can break.

Issue #2: "Server-sent events pass through byte for byte and each chunk is written to the
client as it arrives ... A client that disconnects cancels the upstream request at once.
An upstream that drops mid-stream ends the client's stream with an SSE ``error`` event
and never with ``data: [DONE]``: a truncated answer must never look complete."
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from proxy.mock.payloads import GREETING
from tests.conftest import MakeConfig, MockUpstream, StartGateway, StartUpstream

AsyncClientFactory = Callable[..., openai.AsyncOpenAI]
CHAT = "/v1/chat/completions"
PAUSE = 0.3
WORDS = ("one", " two", " three", " four")
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def _chunk_event(content: str) -> bytes:
    chunk = {"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1,
             "model": "m", "choices": [{"index": 0, "delta": {"content": content},
                                        "finish_reason": None}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


SLOW_EVENTS = [*(_chunk_event(w) for w in WORDS), b"data: [DONE]\n\n"]


def _slow_sse_app(written: list[bytes]) -> web.Application:
    """An upstream that writes ``SLOW_EVENTS`` one ``write`` each, ``PAUSE`` s apart.
    (Its own app: the first event goes with the head at once, where FakeUpstream's
    ``interval`` also precedes the first, and the tests time the arrivals against it.)"""
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, event in enumerate(SLOW_EVENTS):
            if index:
                await asyncio.sleep(PAUSE)
            await response.write(event)
            written.append(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(CHAT, chat)
    return app


def _endless_sse_app(started: asyncio.Event, cancelled: asyncio.Event,
                     headers_delay: float = 0.0) -> web.Application:
    """An upstream that streams forever (or first waits ``headers_delay`` s before its
    headers) and records being cancelled. Its events are 3 s apart: longer than the 1 s
    the tests allow, so a gateway that only noticed the client gone on its next write
    (no cancellation) would be too late. (Its own app: the first tick goes at once, then
    3 s pauses, a timing FakeUpstream's ``interval`` does not give.)"""
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        started.set()
        try:
            await asyncio.sleep(headers_delay)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for _ in range(100):
                await response.write(_chunk_event("tick"))
                await asyncio.sleep(3)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return response

    app = web.Application()
    app.router.add_post(CHAT, chat)
    return app


async def _gateway_for(url: str, make_config: MakeConfig, start_gateway: StartGateway) -> str:
    config = make_config([{"name": "up", "type": "openai_compat", "base_url": url,
                           "models": ["m", "mock-gpt"]}])
    return await start_gateway(config)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


async def _assert_still_serves(gateway: str, session: aiohttp.ClientSession) -> None:
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "again"}]}
    async with session.post(f"{gateway}{CHAT}", json=body) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["choices"][0]["message"]["content"] == f"{GREETING}again"


async def test_chunks_arrive_one_by_one_byte_for_byte(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    session: aiohttp.ClientSession,
) -> None:
    written: list[bytes] = []
    upstream = await start_upstream(_slow_sse_app(written))
    gateway = await _gateway_for(f"{upstream}/v1", make_config, start_gateway)
    arrivals: list[tuple[float, bytes]] = []
    started = time.monotonic()
    async with session.post(f"{gateway}{CHAT}", json=CHAT_BODY) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        async for data in response.content.iter_any():
            arrivals.append((time.monotonic() - started, data))
    first_at, last_at = arrivals[0][0], arrivals[-1][0]
    assert first_at < PAUSE, f"first chunk only after {first_at:.2f} s"
    assert last_at - first_at >= 2 * PAUSE
    assert len(arrivals) >= len(SLOW_EVENTS)  # the pauses keep them from coalescing
    assert arrivals[0][1] == SLOW_EVENTS[0]
    assert b"".join(data for _, data in arrivals) == b"".join(written)
    assert written == SLOW_EVENTS


async def test_sdk_stream_first_chunk_before_upstream_finished(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: AsyncClientFactory,
) -> None:
    written: list[bytes] = []
    upstream = await start_upstream(_slow_sse_app(written))
    client = openai_client(await _gateway_for(f"{upstream}/v1", make_config, start_gateway))
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    seen: list[tuple[float, str, int]] = []
    async for chunk in stream:
        seen.append((time.monotonic() - started, chunk.choices[0].delta.content or "",
                     len(written)))
    assert [text for _, text, _ in seen] == list(WORDS)
    assert seen[0][0] < PAUSE
    assert seen[0][2] < len(SLOW_EVENTS)  # the upstream had not finished writing
    assert seen[-1][0] - seen[0][0] >= 2 * PAUSE


async def test_upstream_drop_mid_stream_ends_with_error_event(
    mock_upstream: MockUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    session: aiohttp.ClientSession,
) -> None:
    gateway = await _gateway_for(mock_upstream.url, make_config, start_gateway)
    body = {**CHAT_BODY, "model": "mock-gpt"}
    headers = {"X-Mock-Disconnect-After": "2"}
    async with session.post(f"{gateway}{CHAT}", json=body, headers=headers) as response:
        assert response.status == 200
        assert response.headers["X-Accel-Buffering"] == "no"
        raw = await response.read()
    assert b"[DONE]" not in raw
    events = [e for e in raw.split(b"\n\n") if e]
    assert len(events) == 4  # role chunk, two content chunks, the error
    assert all(e.startswith(b"data: {") for e in events[:3])
    name, data = events[-1].split(b"\n")
    assert name == b"event: error"
    error = orjson.loads(data.removeprefix(b"data: "))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "upstream_error"
    assert error["code"] in {"upstream_protocol_error", "upstream_unreachable"}
    assert "'up'" in error["message"]  # names the provider, not its URL
    assert "127.0.0.1" not in error["message"]
    await _assert_still_serves(gateway, session)


async def test_upstream_drop_mid_stream_raises_in_sdk(
    mock_upstream: MockUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: AsyncClientFactory, session: aiohttp.ClientSession,
) -> None:
    gateway = await _gateway_for(mock_upstream.url, make_config, start_gateway)
    client = openai_client(gateway)
    stream = await client.chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": "hello"}], stream=True,
        extra_headers={"X-Mock-Disconnect-After": "2"})
    texts: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            texts.append(chunk.choices[0].delta.content or "")
    assert len(texts) == 3  # role chunk and two content chunks came through first
    assert "".join(texts) and "".join(texts) != f"{GREETING}hello"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "upstream_error"
    await _assert_still_serves(gateway, session)


async def _wait(event: asyncio.Event, within: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), within)
    except TimeoutError:
        return False
    return True


async def test_client_disconnect_mid_stream_cancels_upstream(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    upstream = await start_upstream(_endless_sse_app(started, cancelled))
    gateway = await _gateway_for(f"{upstream}/v1", make_config, start_gateway)
    async with aiohttp.ClientSession() as client:
        response = await client.post(f"{gateway}{CHAT}", json=CHAT_BODY)
        assert response.status == 200
        first = await response.content.readline()
        assert first.startswith(b"data: {")
        response.close()  # the client goes away mid-stream
    assert await _wait(cancelled, 1.0), "upstream handler not cancelled within 1 s"


async def test_client_disconnect_before_headers_cancels_upstream(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    upstream = await start_upstream(_endless_sse_app(started, cancelled, headers_delay=5))
    gateway = await _gateway_for(f"{upstream}/v1", make_config, start_gateway)
    async with aiohttp.ClientSession() as client:
        request = asyncio.create_task(client.post(f"{gateway}{CHAT}", json=CHAT_BODY))
        assert await _wait(started, 2.0), "request never reached the upstream"
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    assert await _wait(cancelled, 1.0), "upstream handler not cancelled within 1 s"


async def test_non_stream_keeps_content_length(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    session: aiohttp.ClientSession,
) -> None:
    payload = orjson.dumps({"id": "chatcmpl-x", "object": "chat.completion", "choices": []})

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=payload, content_type="application/json")

    app = web.Application()
    app.router.add_post(CHAT, chat)
    gateway = await _gateway_for(f"{await start_upstream(app)}/v1", make_config, start_gateway)
    body: dict[str, Any] = {**CHAT_BODY, "stream": False}
    async with session.post(f"{gateway}{CHAT}", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(payload))
        assert "Transfer-Encoding" not in response.headers
        assert await response.read() == payload


async def _raw_upstream(reply: bytes) -> tuple[str, asyncio.Server]:
    """A TCP server that reads one request, writes ``reply`` and aborts the connection."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        await reader.readexactly(length)
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(0.1)  # let the gateway receive the partial answer first
        writer.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}/v1", server


async def test_non_stream_cut_mid_body_never_looks_complete(
    make_config: MakeConfig, start_gateway: StartGateway, session: aiohttp.ClientSession,
) -> None:
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
             b"Content-Length: 100\r\n\r\n" + b'{"id": "x"')
    url, server = await _raw_upstream(reply)
    async with server:
        gateway = await _gateway_for(url, make_config, start_gateway)
        body: dict[str, Any] = {**CHAT_BODY, "stream": False}
        # A small non-stream answer is gathered before the status goes out, so the
        # cut is caught in time for a clean 502 (never a complete-looking 200).
        async with session.post(f"{gateway}{CHAT}", json=body) as response:
            assert response.status == 502
            error = (await response.json())["error"]
            assert error["code"] == "upstream_protocol_error"
            assert '{"id": "x"' not in error["message"]


@pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/json"])
async def test_every_streamed_body_tells_nginx_not_to_buffer(
    content_type: str, start_upstream: StartUpstream, start_gateway: StartGateway,
    make_config: MakeConfig,
) -> None:
    """Not only SSE: an NDJSON stream, or a JSON answer too large to hold (over 256 KiB),
    also flows through as it arrives, so nginx must not buffer it either."""
    part = b'{"x": "' + b"y" * 65536 + b'"}\n'

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)
        for _ in range(6):
            await response.write(part)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(CHAT, chat)
    upstream = await start_upstream(app)
    gateway = await start_gateway(make_config([{
        "name": "up", "type": "openai_compat", "base_url": f"{upstream}/v1",
        "models": ["m"]}]))
    async with (aiohttp.ClientSession() as session,
                session.post(f"{gateway}{CHAT}", json={**CHAT_BODY, "stream": False}) as resp):
        body = await resp.read()
        assert resp.status == 200
        assert resp.headers["X-Accel-Buffering"] == "no"
    assert body == part * 6


async def test_a_slow_first_token_gets_keep_alive_comments(
    start_upstream: StartUpstream, start_gateway: StartGateway, make_config: MakeConfig,
    openai_client: AsyncClientFactory,
) -> None:
    """Issue #4: once the upstream answered 200 and the stream waits for its first token,
    SSE comment lines keep load balancers in front from cutting the idle connection."""
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(1.0)  # "thinking" before the first token
        for event in SLOW_EVENTS:
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post(CHAT, chat)
    upstream = await start_upstream(app)
    gateway = await start_gateway(make_config([{
        "name": "up", "type": "openai_compat", "base_url": f"{upstream}/v1",
        "models": ["m"]}], timeouts={"sse_keepalive": 0.3}))
    async with (aiohttp.ClientSession() as session,
                session.post(f"{gateway}{CHAT}", json=CHAT_BODY) as resp):
        body = await resp.read()
    comments, _, rest = body.partition(SLOW_EVENTS[0])
    assert 2 <= comments.count(b": keep-alive\n\n") <= 4, comments
    assert comments == b": keep-alive\n\n" * comments.count(b": keep-alive\n\n")
    assert SLOW_EVENTS[0] + rest == b"".join(SLOW_EVENTS)  # the events themselves intact
    sdk = openai_client(gateway)
    stream = await sdk.chat.completions.create(model="m", messages=[
        {"role": "user", "content": "hi"}], stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "".join(WORDS)
