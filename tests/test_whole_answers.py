"""Whole answers on the wire (``proxy/whole.py``, issue 11): the gateway writes a whole
answer's head itself, so its framing is checked byte by byte here, on raw client
connections: one ``Content-Length`` that matches the body, ``Date`` and ``Server``, the
connection kept alive or closed as the client asked (HTTP/1.1 and 1.0), and no body
for a HEAD or a 204, after which the same connection still serves."""

from __future__ import annotations

import asyncio
import gzip

import orjson
from aiohttp import web
from multidict import CIMultiDict

from proxy.whole import WholeResponse
from tests.conftest import StartLive, StartUpstream
from tests.fake_upstream import FakeUpstream, Reply, Seen
from tests.raw_http import Raw, chat_request

WITHIN = 10.0


async def _answer(raw: Raw, *, body: bool = True) -> tuple[str, list[tuple[str, str]], bytes]:
    """The status line, every header line in order, and the Content-Length body."""
    head = await asyncio.wait_for(raw.reader.readuntil(b"\r\n\r\n"), WITHIN)
    status, *lines = head[:-4].decode("latin-1").split("\r\n")
    headers = [(name.strip().lower(), value.strip())
               for name, _, value in (line.partition(":") for line in lines)]
    lengths = [int(value) for name, value in headers if name == "content-length"]
    assert len(lengths) <= 1, headers
    size = lengths[0] if lengths and body else 0
    data = await asyncio.wait_for(raw.reader.readexactly(size), WITHIN)
    return status, headers, data


def _names(headers: list[tuple[str, str]]) -> list[str]:
    return [name for name, _ in headers]


async def _raw(url: str) -> Raw:
    return await Raw.open(url)


async def test_a_whole_answer_has_one_matching_length_and_keeps_the_connection(
    live_gateway: StartLive,
) -> None:
    gateway = await live_gateway(cache={"enabled": False}, dedup={"mode": "off"})
    raw = await _raw(gateway.url)
    try:
        for call in (1, 2):  # the same connection serves the second
            await raw.send(chat_request())
            status, headers, body = await _answer(raw)
            assert status == "HTTP/1.1 200 OK"
            names = _names(headers)
            assert names.count("content-length") == 1
            assert dict(headers)["content-length"] == str(len(body))
            for name in ("date", "server", "x-request-id", "x-gateway-overhead-ms"):
                assert names.count(name) == 1, headers
            assert "transfer-encoding" not in names and "connection" not in names
            assert dict(headers)["content-type"] == "application/json"
            assert orjson.loads(body)["id"] == f"answer-{call}"
    finally:
        await raw.close()


async def test_a_client_that_closes_gets_connection_close_then_the_close(
    live_gateway: StartLive,
) -> None:
    gateway = await live_gateway(cache={"enabled": False}, dedup={"mode": "off"})
    for request in (chat_request(b"Connection: close\r\n"),
                    chat_request().replace(b"HTTP/1.1", b"HTTP/1.0", 1)):
        raw = await _raw(gateway.url)
        try:
            await raw.send(request)
            status, headers, body = await _answer(raw)
            version = request.split(b"\r\n")[0].rsplit(b" ", 1)[1].decode()
            assert status == f"{version} 200 OK"
            assert dict(headers)["content-length"] == str(len(body))
            assert orjson.loads(body)["object"] == "chat.completion"
            if version == "HTTP/1.1":
                assert dict(headers)["connection"] == "close"
            assert await raw.closed()
        finally:
            await raw.close()


async def test_no_body_after_a_204_or_a_head_and_the_connection_serves_on(
    fake_upstream: FakeUpstream, live_gateway: StartLive,
) -> None:
    async def hook(request: web.Request, seen: Seen) -> Reply | None:
        return Reply(status=204, body=b"") if seen.call == 1 else None

    fake_upstream.hook = hook
    gateway = await live_gateway(cache={"enabled": False}, dedup={"mode": "off"})
    raw = await _raw(gateway.url)
    try:
        await raw.send(chat_request())
        status, headers, body = await _answer(raw)
        assert status == "HTTP/1.1 204 No Content" and body == b""
        assert "content-length" not in _names(headers)
        # The fake takes no HEAD: its 405 comes back as a whole answer, without a body.
        await raw.send(b"HEAD /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n\r\n")
        status, headers, _ = await _answer(raw, body=False)
        assert status == "HTTP/1.1 405 Method Not Allowed", headers
        await raw.send(chat_request())  # framing intact: the next answer parses whole
        status, headers, body = await _answer(raw)
        assert status == "HTTP/1.1 200 OK"
        assert orjson.loads(body)["object"] == "chat.completion"
    finally:
        await raw.close()


async def test_what_the_fast_path_does_not_do_takes_aiohttps_own(
    start_upstream: StartUpstream,
) -> None:
    """A WholeResponse someone asks to compress or to set a cookie on, on HTTP/1.1 or
    1.0, is written by ``web.Response``'s own path (the gateway does neither today: a
    guard against a silent drop, or a crash on HTTP/1.0)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        response = WholeResponse(200, None, CIMultiDict({"Content-Type": "text/plain"}),
                                 b"x" * 2000)
        response.set_cookie("seen", "1")
        response.enable_compression()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    url = await start_upstream(app)
    for version in (b"HTTP/1.1", b"HTTP/1.0"):
        raw = await _raw(url)
        try:
            await raw.send(b"GET / %s\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n" % version)
            status, headers, body = await _answer(raw)
            assert status.endswith(" 200 OK"), status
            assert dict(headers)["set-cookie"].startswith("seen=1")
            assert dict(headers)["content-encoding"] == "gzip"
            assert gzip.decompress(body) == b"x" * 2000
        finally:
            await raw.close()
