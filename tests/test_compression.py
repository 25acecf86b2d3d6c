"""Response compression (issue 10): large non-stream answers the upstream sent
uncompressed are gzip'ed for a client that accepts gzip, and nothing else is.

Every case runs the real gateway against an upstream defined here, and reads the
gateway's raw bytes (``auto_decompress=False``): a compressed answer must decode to
exactly the upstream's bytes, with a Content-Length (or chunked framing) that fits.
"""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.compression import accepts_gzip
from proxy.config.loader import ConfigError
from proxy.mock.payloads import EmbeddingInput, embeddings
from proxy.streaming import SMALL_ANSWER
from tests.conftest import MakeConfig, StartGateway, StartUpstream

GZIP = {"Accept-Encoding": "gzip, deflate"}
IDENTITY = {"Accept-Encoding": "identity"}
MODELS = [f"model-{i:03d}" for i in range(300)]
MODEL = MODELS[0]


def embedding_bytes(count: int, dim: int = 1536) -> bytes:
    """The upstream's embeddings answer for ``count`` inputs: floats, as vLLM sends them."""
    inputs = [EmbeddingInput(orjson.dumps(f"text {i}"), 2) for i in range(count)]
    return orjson.dumps(embeddings(MODEL, inputs, dim, as_base64=False))


def sized(size: int) -> bytes:
    """A JSON body of exactly ``size`` bytes."""
    return b'{"pad":"' + b"x" * (size - 10) + b'"}'


class Upstream:
    """Answers what each request's JSON asks for: ``inputs`` embeddings, or a chat answer
    of ``size`` bytes (streamed as SSE when ``stream``) with ``headers`` and ``status``;
    ``cut`` stops after that many bytes of a larger promised body, ``hold`` waits after
    that many for ``release``; ``gzipped`` sends it
    gzip'ed, as an upstream that compresses itself does."""

    def __init__(self, delay: float = 0.0):
        self.calls = 0
        self.delay = delay
        self.sent: list[bytes] = []
        self.release = asyncio.Event()  # ``hold``: the rest of the body may go

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in MODELS]})

    async def embeddings(self, request: web.Request) -> web.Response:
        self.calls += 1
        asked = await request.json()
        body = embedding_bytes(len(asked["input"]))
        self.sent.append(body)
        return web.Response(body=body, content_type="application/json")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        asked = await request.json()
        await asyncio.sleep(self.delay)
        body = sized(asked.get("size", 2000))
        self.sent.append(body)
        headers = {"Content-Type": "application/json", **asked.get("headers", {})}
        if asked.get("gzipped"):  # as an upstream that compresses itself sends it
            body = self.sent[-1] = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        if asked.get("stream"):
            return await self._events(request, body)
        if "cut" in asked:
            return await self._cut(request, body, asked["cut"])
        if "hold" in asked:
            return await self._hold(request, body, asked["hold"])
        return web.Response(status=asked.get("status", 200), body=body, headers=headers)

    async def _events(self, request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in (b"data: " + body + b"\n\n", b"data: [DONE]\n\n"):
            await response.write(part)
        await response.write_eof()
        return response

    async def _hold(self, request: web.Request, body: bytes, at: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(body[:at])
        await asyncio.wait_for(self.release.wait(), 5)
        await response.write(body[at:])
        await response.write_eof()
        return response

    async def _cut(self, request: web.Request, body: bytes, cut: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[:cut])
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response


Gateway = Callable[..., Any]


@pytest.fixture
def gateway(start_upstream: StartUpstream, make_config: MakeConfig,
            start_gateway: StartGateway) -> Gateway:
    async def start(upstream: Upstream, **raw: Any) -> str:
        url = await start_upstream(upstream.app())
        raw.setdefault("cache", {"enabled": False})
        return await start_gateway(make_config(
            [{"name": "up", "type": "openai_compat", "base_url": f"{url}/v1",
              "models": MODELS}], **raw))

    return start


@pytest.fixture
async def raw() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that shows the bytes as they came, and sends only the headers given."""
    async with aiohttp.ClientSession(auto_decompress=False,
                                     skip_auto_headers=("Accept-Encoding",)) as session:
        yield session


Reply = tuple[int, CIMultiDictProxy[str], bytes]


async def post(session: aiohttp.ClientSession, url: str, payload: dict[str, Any],
               headers: dict[str, str]) -> Reply:
    async with session.post(url, json=payload, headers=headers) as response:
        return response.status, response.headers, await response.read()


async def get(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Reply:
    async with session.get(url, headers=headers) as response:
        return response.status, response.headers, await response.read()


def assert_gzip(reply: Reply, expected: bytes) -> None:
    status, headers, body = reply
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in headers.getall("Vary")
    assert gzip.decompress(body) == expected
    assert len(body) < len(expected) // 2


def assert_identity(reply: Reply, expected: bytes, status: int = 200) -> None:
    assert reply[0] == status
    assert "Content-Encoding" not in reply[1]
    assert reply[2] == expected


async def test_a_300_model_listing_is_gzipped_when_asked(gateway: Gateway,
                                                         raw: aiohttp.ClientSession) -> None:
    url = f"{await gateway(Upstream())}/v1/models"
    plain = await get(raw, url, IDENTITY)
    assert len(orjson.loads(plain[2])["data"]) == 300
    assert "Accept-Encoding" in plain[1].getall("Vary")
    packed = await get(raw, url, GZIP)
    assert_gzip(packed, plain[2])
    assert packed[1]["Content-Length"] == str(len(packed[2]))
    assert len(packed[2]) < len(plain[2]) // 10  # model ids repeat: ~3 % of the size


async def test_one_model_object_is_small_and_left_alone(gateway: Gateway,
                                                        raw: aiohttp.ClientSession) -> None:
    reply = await get(raw, f"{await gateway(Upstream())}/v1/models/model-007", GZIP)
    assert reply[0] == 200
    assert "Content-Encoding" not in reply[1]
    assert orjson.loads(reply[2])["id"] == "model-007"


@pytest.mark.parametrize("inputs", [2, 16], ids=["in-one-piece", "streamed-chunked"])
async def test_embeddings_are_gzipped_and_decode_to_the_upstreams_bytes(
    gateway: Gateway, raw: aiohttp.ClientSession, inputs: int,
) -> None:
    """2 x 1536 floats (~65 KiB) are sent in one piece with a Content-Length; 16 x 1536
    (~510 KiB, over ``SMALL_ANSWER``) continue as a chunked gzip stream."""
    upstream = Upstream()
    url = f"{await gateway(upstream)}/v1/embeddings"
    reply = await post(raw, url, {"model": MODEL, "input": ["t"] * inputs}, GZIP)
    assert_gzip(reply, upstream.sent[0])
    if len(upstream.sent[0]) > SMALL_ANSWER:
        assert "Content-Length" not in reply[1]
        assert reply[1]["Transfer-Encoding"] == "chunked"
    else:
        assert reply[1]["Content-Length"] == str(len(reply[2]))


@pytest.mark.parametrize("accept", ["", "identity", "gzip;q=0", "deflate, br", "*;q=0"])
async def test_not_gzipped_when_the_client_did_not_ask(
    gateway: Gateway, raw: aiohttp.ClientSession, accept: str,
) -> None:
    upstream = Upstream()
    url = f"{await gateway(upstream)}/v1/embeddings"
    headers = {"Accept-Encoding": accept} if accept else {}
    reply = await post(raw, url, {"model": MODEL, "input": ["t"] * 16}, headers)
    assert_identity(reply, upstream.sent[0])
    assert "Accept-Encoding" in reply[1].getall("Vary")  # a cache in front keeps both apart


async def test_an_event_stream_is_never_gzipped(gateway: Gateway,
                                                raw: aiohttp.ClientSession) -> None:
    upstream = Upstream()
    url = f"{await gateway(upstream)}/v1/chat/completions"
    reply = await post(raw, url, {"model": MODEL, "stream": True, "size": 50_000}, GZIP)
    assert_identity(reply, b"data: " + upstream.sent[0] + b"\n\ndata: [DONE]\n\n")
    assert "Vary" not in reply[1]


@pytest.mark.parametrize("headers", [
    {"Content-Encoding": "identity"},
    {"Content-Type": "audio/mpeg"},
    {"Cache-Control": "no-transform"},
], ids=["already-encoded", "not-text", "no-transform"])
async def test_answers_the_gateway_must_not_transform_pass_untouched(
    gateway: Gateway, raw: aiohttp.ClientSession, headers: dict[str, str],
) -> None:
    upstream = Upstream()
    url = f"{await gateway(upstream)}/v1/chat/completions"
    reply = await post(raw, url, {"model": MODEL, "size": 50_000, "headers": headers}, GZIP)
    assert reply[0] == 200
    assert reply[1].get("Content-Encoding") == headers.get("Content-Encoding")
    assert reply[2] == upstream.sent[0]
    assert "Vary" not in reply[1]


async def test_an_upstream_gzip_body_is_not_compressed_twice(
    gateway: Gateway, raw: aiohttp.ClientSession,
) -> None:
    upstream = Upstream()
    url = f"{await gateway(upstream)}/v1/chat/completions"
    reply = await post(raw, url, {"model": MODEL, "size": 50_000, "gzipped": True}, GZIP)
    assert reply[1]["Content-Encoding"] == "gzip"
    assert reply[2] == upstream.sent[0]  # relayed as it came: one gzip layer
    assert gzip.decompress(reply[2]) == sized(50_000)


@pytest.mark.parametrize(("size", "packed"), [(1024, False), (1025, True)])
async def test_answers_up_to_1_kib_are_left_alone(
    gateway: Gateway, raw: aiohttp.ClientSession, size: int, packed: bool,
) -> None:
    upstream = Upstream()
    url = f"{await gateway(upstream)}/v1/chat/completions"
    reply = await post(raw, url, {"model": MODEL, "size": size}, GZIP)
    if packed:
        assert_gzip(reply, upstream.sent[0])
    else:
        assert_identity(reply, upstream.sent[0])
        assert "Vary" not in reply[1]


async def test_error_answers_are_sent_as_the_provider_wrote_them(
    gateway: Gateway, raw: aiohttp.ClientSession,
) -> None:
    upstream = Upstream()
    url = f"{await gateway(upstream)}/v1/chat/completions"
    reply = await post(raw, url, {"model": MODEL, "size": 5000, "status": 400}, GZIP)
    assert_identity(reply, upstream.sent[0], status=400)


async def test_compression_can_be_turned_off(gateway: Gateway,
                                             raw: aiohttp.ClientSession) -> None:
    upstream = Upstream()
    base = await gateway(upstream, compression={"enabled": False})
    reply = await post(raw, f"{base}/v1/embeddings", {"model": MODEL, "input": ["t"]}, GZIP)
    assert_identity(reply, upstream.sent[0])
    assert "Vary" not in reply[1]
    listing = await get(raw, f"{base}/v1/models", GZIP)
    assert "Content-Encoding" not in listing[1]


async def test_cache_hits_and_dedup_followers_are_gzipped_too(
    gateway: Gateway, raw: aiohttp.ClientSession,
) -> None:
    upstream = Upstream(delay=0.3)
    url = f"{await gateway(upstream, cache={'enabled': True})}/v1/chat/completions"
    payload = {"model": MODEL, "temperature": 0, "size": 20_000, "messages": []}
    together = await asyncio.gather(*(post(raw, url, payload, GZIP) for _ in range(3)))
    hit = await post(raw, url, payload, GZIP)
    assert upstream.calls == 1
    assert sorted(r[1]["X-Gateway-Dedup"] for r in together) == [
        "follower", "follower", "leader"]
    assert hit[1]["X-Cache"] == "HIT"
    for reply in (*together, hit):
        assert_gzip(reply, upstream.sent[0])


async def test_a_large_gzipped_answer_is_relayed_as_it_arrives(
    gateway: Gateway, raw: aiohttp.ClientSession,
) -> None:
    """Past ``SMALL_ANSWER`` each chunk is compressed and flushed as it comes: the
    client decodes what the upstream sent so far before the rest exists."""
    upstream = Upstream()
    url = f"{await gateway(upstream)}/v1/chat/completions"
    at = SMALL_ANSWER + 50_000
    payload = {"model": MODEL, "size": 600_000, "hold": at}
    async with raw.post(url, json=payload, headers=GZIP) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        decoder = zlib.decompressobj(31)
        decoded = b""
        while len(decoded) < at:
            chunk = await asyncio.wait_for(response.content.readany(), 5)
            assert chunk, "the answer ended early"
            decoded += decoder.decompress(chunk)
        assert len(decoded) == at  # all of it, and nothing the upstream has not sent
        upstream.release.set()
        decoded += decoder.decompress(await response.read()) + decoder.flush()
    assert decoded == upstream.sent[0]
    assert decoder.eof


async def test_an_upstream_cut_mid_answer_never_looks_complete(
    gateway: Gateway, raw: aiohttp.ClientSession,
) -> None:
    url = f"{await gateway(Upstream())}/v1/chat/completions"
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(raw, url, {"model": MODEL, "size": 600_000, "cut": 400_000}, GZIP)


async def test_the_openai_sdk_decodes_it_transparently(
    gateway: Gateway, openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    upstream = Upstream()
    client = openai_client(await gateway(upstream))
    response = await client.embeddings.with_raw_response.create(
        model=MODEL, input=["a"] * 16, encoding_format="float")
    assert response.headers["Content-Encoding"] == "gzip"
    result = response.parse()
    expected = orjson.loads(upstream.sent[0])
    assert [item.embedding for item in result.data] == [
        item["embedding"] for item in expected["data"]]
    models = await client.models.list()
    assert [m.id for m in models.data] == MODELS


@pytest.mark.parametrize(("value", "accepted"), [
    ("gzip", True), ("GZIP", True), ("deflate, gzip;q=0.5", True), ("x-gzip", True),
    ("*", True), ("br;q=1, *;q=0.1", True), ("gzip;q=0", False), ("gzip; q=0.000", False),
    ("*;q=0", False), ("gzip;q=0, *", False), ("identity", False), ("", False),
    (None, False), ("gzip;q=banana", False), ("deflate, br", False),
])
def test_accept_encoding_weights(value: str | None, accepted: bool) -> None:
    assert accepts_gzip(value) is accepted


@pytest.mark.parametrize(("section", "problem"), [
    ({"level": 0}, "compression.level: must be greater than 0"),
    ({"level": 10}, "compression.level: must be a zlib level between 1 and 9"),
    ({"min_bytes": -1}, "compression.min_bytes: must not be negative"),
    ({"enabled": "yes"}, "compression.enabled: must be true or false"),
    ({"gzip": True}, "compression.gzip: unknown key"),
])
def test_bad_compression_settings_are_refused(make_config: MakeConfig,
                                              section: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make_config([], compression=section)
    assert problem in str(caught.value)


async def test_ollama_embeddings_translated_by_the_gateway_are_gzipped(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    raw: aiohttp.ClientSession,
) -> None:
    """Ollama never compresses; its ``/api/embed`` answer, translated to an OpenAI
    list by the gateway, is the typical large uncompressed body."""
    vectors = [[i / 1536 + j for i in range(1536)] for j in range(16)]

    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": "emb", "model": "emb"}]})

    async def embed(request: web.Request) -> web.Response:
        return web.json_response({"model": "emb", "embeddings": vectors,
                                  "prompt_eval_count": 16})

    app = web.Application()
    app.router.add_get("/api/tags", tags)
    app.router.add_post("/api/embed", embed)
    url = await start_upstream(app)
    base = await start_gateway(make_config([{"name": "ol", "type": "ollama",
                                             "base_url": url, "models": ["emb"]}]))
    payload = {"model": "emb", "input": ["t"] * 16}
    plain = await post(raw, f"{base}/v1/embeddings", payload, IDENTITY)
    assert [item["embedding"] for item in orjson.loads(plain[2])["data"]] == vectors
    assert_gzip(await post(raw, f"{base}/v1/embeddings", payload, GZIP), plain[2])
