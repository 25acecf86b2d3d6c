"""Which headers cross the gateway, in each direction (issue #2, "HTTP hygiene").

End-to-end headers pass through unchanged both ways; hop-by-hop headers (RFC 9110
section 7.6.1: ``Connection`` and every header it names, ``Keep-Alive``, ``TE``,
``Trailer``, ``Upgrade``, ``Proxy-*``) never do. aiohttp's own client and server refuse
or rewrite some of those, so those cases speak raw HTTP/1.1 over an asyncio socket.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, istr
from openai.types.chat import ChatCompletionMessageParam
from yarl import URL

from proxy.headers import end_to_end
from tests.conftest import MakeConfig, StartFake, StartGateway, StartLive
from tests.fake_upstream import FakeUpstream, Reply, Seen, replaced

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m1", "messages": MESSAGES}
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}
SECRET = "sk-upstream-secret"


Gateway = Callable[..., Awaitable[tuple[str, FakeUpstream]]]


@pytest.fixture
def fake_gateway(start_fake: StartFake, live_gateway: StartLive) -> Gateway:
    """``await gateway(env=None, **provider_extra)`` -> (the gateway's base URL, its
    counting fake upstream, which keeps the headers of each request and answers
    ``ANSWER``)."""
    async def start(env: dict[str, str] | None = None, **extra: Any
                    ) -> tuple[str, FakeUpstream]:
        fake = await start_fake(("m1",), body=ANSWER)
        return (await live_gateway(fake.provider(**extra), env=env or {})).url, fake

    return start


def provider(url: str, **extra: Any) -> dict[str, Any]:
    return {"name": "up", "type": "openai_compat", "base_url": f"{url}/v1",
            "models": ["m1"], **extra}


async def raw_exchange(base_url: str, head: str, body: bytes = b""
                       ) -> tuple[int, CIMultiDict[str], bytes]:
    """Send a hand-made HTTP/1.1 request; return status, headers and body of the answer
    (framed by Content-Length, or read to EOF)."""
    url = URL(base_url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in filter(None, lines):
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        if "Content-Length" in headers:
            data = await asyncio.wait_for(
                reader.readexactly(int(headers["Content-Length"])), 5)
        else:
            data = await asyncio.wait_for(reader.read(), 5)
        return int(status_line.split()[1]), headers, data
    finally:
        writer.close()


def request_head(path: str, extra_lines: list[str], body: bytes) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: gateway.test",
             "Content-Type: application/json", f"Content-Length: {len(body)}", *extra_lines]
    return "\n".join(lines) + "\n"


async def post_chat(url: str, session_options: dict[str, Any] | None = None, **kwargs: Any
                    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
    """One chat request with aiohttp's client: status, headers and body as received."""
    async with (aiohttp.ClientSession(**(session_options or {})) as session,
                session.post(url, json=CHAT, **kwargs) as resp):
        return resp.status, resp.headers, await resp.read()


async def test_end_to_end_request_headers_pass_and_hop_by_hop_are_stripped(
    fake_gateway: Gateway,
) -> None:
    gateway, upstream = await fake_gateway()
    body = orjson.dumps(CHAT)
    head = request_head("/v1/chat/completions", [
        "X-Custom: 1", "OpenAI-Organization: org-123", "User-Agent: my-agent/1.0",
        "Connection: keep-alive, X-Hop", "X-Hop: secret", "Keep-Alive: timeout=5",
        "TE: trailers", "Trailer: X-Checksum", "Upgrade: h2c",
        "Proxy-Authorization: Basic cHJveHk6c2VjcmV0", "Proxy-Connection: keep-alive",
    ], body)
    status, _, answer = await raw_exchange(gateway, head, body)
    assert status == 200, answer
    assert orjson.loads(answer) == ANSWER
    seen = upstream.headers()
    assert len(seen) == 1
    got = seen[0]
    assert got["X-Custom"] == "1"
    assert got["OpenAI-Organization"] == "org-123"
    assert got["User-Agent"] == "my-agent/1.0"
    for name in ("X-Hop", "Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Authorization",
                 "Proxy-Connection"):
        assert name not in got, f"hop-by-hop {name} reached the upstream"
    assert "x-hop" not in got.get("Connection", "").lower()
    assert "secret" not in str(list(got.items()))


async def test_forwarded_headers_are_set(
    fake_gateway: Gateway,
) -> None:
    gateway, upstream = await fake_gateway()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
        async with session.post(f"{gateway}/v1/chat/completions", json=CHAT,
                                headers={"X-Forwarded-For": "10.0.0.1"}) as resp:
            assert resp.status == 200
    seen = upstream.headers()
    assert [h["X-Forwarded-For"] for h in seen] == ["127.0.0.1", "10.0.0.1, 127.0.0.1"]
    assert [h["X-Forwarded-Proto"] for h in seen] == ["http", "http"]


async def test_request_id_from_client_is_sent_upstream_and_returned(
    fake_gateway: Gateway,
) -> None:
    gateway, upstream = await fake_gateway()

    async def no_request_id(request: web.Request, seen: Seen) -> web.StreamResponse:
        """An upstream that sends no request id of its own (the fake numbers its own)."""
        return web.json_response(ANSWER)

    upstream.hook = no_request_id
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{gateway}/v1/chat/completions", json=CHAT,
                                headers={"X-Request-ID": "req-abc-123"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-ID"] == "req-abc-123"
            assert "X-Upstream-Request-ID" not in resp.headers
        async with session.post(f"{gateway}/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
            generated = resp.headers["X-Request-ID"]
    seen = upstream.headers()
    assert seen[0]["X-Request-ID"] == "req-abc-123"
    assert len(generated) >= 16
    assert generated != "req-abc-123"
    assert seen[1]["X-Request-ID"] == generated


async def test_upstream_request_id_is_returned_as_upstream_request_id(
    fake_gateway: Gateway,
) -> None:
    gateway, upstream = await fake_gateway()
    upstream.chat.headers = {"X-Request-ID": "upstream-xyz"}
    status, headers, _ = await post_chat(f"{gateway}/v1/chat/completions",
                                         headers={"X-Request-ID": "req-client-1"})
    assert status == 200
    assert headers.getall("X-Request-ID") == ["req-client-1"]
    assert headers["X-Upstream-Request-ID"] == "upstream-xyz"


RawUpstream = Callable[[int, str, list[str], bytes], Awaitable[str]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    """Start upstreams writing a hand-made answer, with headers aiohttp's server would
    not send; each call returns a base URL. All are closed after the test."""
    servers: list[asyncio.Server] = []

    async def start(status: int, reason: str, headers: list[str], body: bytes) -> str:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                lines = [f"HTTP/1.1 {status} {reason}", *headers,
                         f"Content-Length: {len(body)}", "", ""]
                writer.write("\r\n".join(lines).encode() + body)
                await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


RESPONSE_HEADERS = [
    "Content-Type: application/json",
    "Retry-After: 7",
    "x-ratelimit-remaining-requests: 42",
    "openai-processing-ms: 123",
    "X-Custom-Resp: yes",
    "Connection: X-Resp-Hop",
    "X-Resp-Hop: 1",
    "Keep-Alive: timeout=5, max=100",
    "Upgrade: h2c",
]


async def check_response_headers(status: int, reason: str, raw_upstream: RawUpstream,
                                 make_config: MakeConfig, start_gateway: StartGateway) -> None:
    body = orjson.dumps({"error": {"message": "slow down", "type": "requests",
                                   "param": None, "code": "rate_limit"}}
                        if status >= 400 else ANSWER)
    url = await raw_upstream(status, reason, RESPONSE_HEADERS, body)
    gateway = await start_gateway(make_config([provider(url)]))
    got_status, got, got_body = await post_chat(f"{gateway}/v1/chat/completions")
    assert got_status == status
    assert got_body == body
    assert got["Retry-After"] == "7"
    assert got["x-ratelimit-remaining-requests"] == "42"
    assert got["openai-processing-ms"] == "123"
    assert got["X-Custom-Resp"] == "yes"
    for name in ("X-Resp-Hop", "Keep-Alive", "Upgrade"):
        assert name not in got, f"hop-by-hop {name} reached the client"
    assert "x-resp-hop" not in got.get("Connection", "").lower()


async def test_response_headers_pass_and_hop_by_hop_are_stripped_on_success(
    raw_upstream: RawUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    await check_response_headers(200, "OK", raw_upstream, make_config, start_gateway)


async def test_response_headers_pass_and_hop_by_hop_are_stripped_on_upstream_error(
    raw_upstream: RawUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    await check_response_headers(429, "Too Many Requests", raw_upstream, make_config,
                                 start_gateway)


async def test_configured_key_replaces_client_authorization(
    fake_gateway: Gateway, openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    gateway, upstream = await fake_gateway(env={"UP_KEY": SECRET}, api_key_env="UP_KEY",
                                           headers={"X-Title": "my-app"})
    client = openai_client(gateway, api_key="sk-client-test")
    await client.chat.completions.create(model="m1", messages=MESSAGES)
    seen = upstream.headers()
    assert seen[0].getall("Authorization") == [f"Bearer {SECRET}"]
    assert seen[0]["X-Title"] == "my-app"


async def test_client_authorization_is_forwarded_without_configured_key(
    fake_gateway: Gateway, openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    gateway, upstream = await fake_gateway()
    client = openai_client(gateway, api_key="sk-client-test")
    await client.chat.completions.create(model="m1", messages=MESSAGES)
    seen = upstream.headers()
    assert seen[0].getall("Authorization") == ["Bearer sk-client-test"]


def gzipping(fake: FakeUpstream, compressed: bytes) -> FakeUpstream:
    """``fake`` answers ``compressed`` (gzip) only when the request accepts gzip."""
    gzipped = replaced(fake.chat, body=compressed, headers={"Content-Encoding": "gzip"})

    async def hook(request: web.Request, seen: Seen) -> Reply | None:
        return gzipped if "gzip" in seen.headers.get("Accept-Encoding", "") else None

    fake.hook = hook
    return fake


async def test_gzip_answer_passes_through_compressed(
    fake_gateway: Gateway,
) -> None:
    compressed = gzip.compress(orjson.dumps(ANSWER))
    gateway, upstream = await fake_gateway()
    gzipping(upstream, compressed)
    url = f"{gateway}/v1/chat/completions"
    gz = {"Accept-Encoding": "gzip"}
    status, headers, body = await post_chat(url, {"auto_decompress": False}, headers=gz)
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert body == compressed
    status, _, body = await post_chat(url, headers=gz)  # aiohttp's client decodes it
    assert status == 200
    assert orjson.loads(body) == ANSWER
    assert [h["Accept-Encoding"] for h in upstream.headers()] == ["gzip", "gzip"]


async def test_no_accept_encoding_from_client_means_none_upstream(
    fake_gateway: Gateway,
) -> None:
    gateway, upstream = await fake_gateway()
    gzipping(upstream, b"")
    status, headers, body = await post_chat(f"{gateway}/v1/chat/completions",
                                            {"skip_auto_headers": ("Accept-Encoding",)})
    assert status == 200
    assert "Content-Encoding" not in headers
    assert orjson.loads(body) == ANSWER
    seen = upstream.headers()
    assert len(seen) == 1
    assert "Accept-Encoding" not in seen[0]


def test_hop_by_hop_names_match_in_any_case() -> None:
    """HTTP/2 clients (through nginx) send every header name in lower case."""
    incoming = CIMultiDictProxy(CIMultiDict([
        ("keep-alive", "timeout=5"), ("te", "trailers"), ("PROXY-AUTHORIZATION", "Basic x"),
        ("connection", "x-hop"), ("X-HOP", "1"), ("x-kept", "1"), ("host", "h")]))
    out = end_to_end(incoming, frozenset({istr("Host")}))
    assert list(out.items()) == [("x-kept", "1")]


async def test_gateway_control_headers_stay_in_the_gateway(
    fake_gateway: Gateway,
) -> None:
    gateway, upstream = await fake_gateway()
    status, _, _ = await post_chat(f"{gateway}/v1/chat/completions", headers={
        "X-Gateway-Dedup": "off", "X-Gateway-Cache": "off", "X-Gateway-Peer": "1",
        "Cache-Control": "no-cache"})
    assert status == 200
    seen = upstream.headers()
    names = {name.lower() for name in seen[0]}
    assert not {n for n in names if n.startswith("x-gateway-")}, names
    assert seen[0]["Cache-Control"] == "no-cache"  # end-to-end: the provider may use it



@pytest.mark.parametrize("padding", [0, 60], ids=["cached", "long"])
def test_connection_named_headers_are_dropped_whatever_the_value_length(padding: int) -> None:
    """Short ``Connection`` values are cached per value, long ones (over 256 chars) are
    parsed each time (``headers._skipped``): both drop every header they name, and a
    cached value does so on every message, not only the first."""
    named = ", ".join(f"x-pad-{i}" for i in range(padding))
    connection = f"{named}, X-Hop" if named else "keep-alive, X-Hop"
    assert (len(connection) > 256) is bool(padding)
    for _ in range(2):
        got = end_to_end(CIMultiDict([("Connection", connection), ("X-Hop", "secret"),
                                      ("x-pad-3", "p"), ("X-Kept", "yes")]))
        kept = [("X-Kept", "yes")] if padding else [("x-pad-3", "p"), ("X-Kept", "yes")]
        assert list(got.items()) == kept
