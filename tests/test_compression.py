"""Response compression (issue 10): large non-stream answers the upstream sent
uncompressed are gzip'ed for a client that accepts gzip, and nothing else is.

Every case runs the real gateway against the counting fake upstream
(tests/fake_upstream.py), its answer scripted per test, and reads the gateway's raw
bytes (``auto_decompress=False``): a compressed answer must decode to exactly the
upstream's bytes, with a Content-Length (or chunked framing) that fits.
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
from tests.conftest import MakeConfig, StartFake, StartGateway, StartLive, StartUpstream
from tests.fake_upstream import DONE, FakeUpstream, Seen, replaced

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


Gateway = Callable[..., Any]


@pytest.fixture
def gateway(start_fake: StartFake, live_gateway: StartLive) -> Gateway:
    """``await gateway(**raw_config)`` -> (the gateway's base URL, its fake upstream,
    which lists ``MODELS``); the cache is off unless ``raw_config`` turns it on."""
    async def start(**raw: Any) -> tuple[str, FakeUpstream]:
        fake = await start_fake(tuple(MODELS))
        raw.setdefault("cache", {"enabled": False})
        return (await live_gateway(fake, **raw)).url, fake

    return start


def answering(fake: FakeUpstream, body: bytes, **reply: Any) -> bytes:
    """``fake`` answers chat with ``body`` (and ``reply``'s other fields); returns it."""
    fake.chat = replaced(fake.chat, body=body, **reply)
    return body


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
    base, _ = await gateway()
    url = f"{base}/v1/models"
    plain = await get(raw, url, IDENTITY)
    assert len(orjson.loads(plain[2])["data"]) == 300
    assert "Accept-Encoding" in plain[1].getall("Vary")
    packed = await get(raw, url, GZIP)
    assert_gzip(packed, plain[2])
    assert packed[1]["Content-Length"] == str(len(packed[2]))
    assert len(packed[2]) < len(plain[2]) // 10  # model ids repeat: ~3 % of the size


async def test_one_model_object_is_small_and_left_alone(gateway: Gateway,
                                                        raw: aiohttp.ClientSession) -> None:
    base, _ = await gateway()
    reply = await get(raw, f"{base}/v1/models/model-007", GZIP)
    assert reply[0] == 200
    assert "Content-Encoding" not in reply[1]
    assert orjson.loads(reply[2])["id"] == "model-007"


@pytest.mark.parametrize("inputs", [2, 16], ids=["in-one-piece", "streamed-chunked"])
async def test_embeddings_are_gzipped_and_decode_to_the_upstreams_bytes(
    gateway: Gateway, raw: aiohttp.ClientSession, inputs: int,
) -> None:
    """2 x 1536 floats (~65 KiB) are sent in one piece with a Content-Length; 16 x 1536
    (~510 KiB, over ``SMALL_ANSWER``) continue as a chunked gzip stream."""
    base, upstream = await gateway()
    sent = upstream.embeddings.body = embedding_bytes(inputs)
    reply = await post(raw, f"{base}/v1/embeddings", {"model": MODEL, "input": ["t"] * inputs},
                       GZIP)
    assert_gzip(reply, sent)
    if len(sent) > SMALL_ANSWER:
        assert "Content-Length" not in reply[1]
        assert reply[1]["Transfer-Encoding"] == "chunked"
    else:
        assert reply[1]["Content-Length"] == str(len(reply[2]))


@pytest.mark.parametrize("accept", ["", "identity", "gzip;q=0", "deflate, br", "*;q=0"])
async def test_not_gzipped_when_the_client_did_not_ask(
    gateway: Gateway, raw: aiohttp.ClientSession, accept: str,
) -> None:
    base, upstream = await gateway()
    sent = upstream.embeddings.body = embedding_bytes(16)
    headers = {"Accept-Encoding": accept} if accept else {}
    reply = await post(raw, f"{base}/v1/embeddings", {"model": MODEL, "input": ["t"] * 16},
                       headers)
    assert_identity(reply, sent)
    assert "Accept-Encoding" in reply[1].getall("Vary")  # a cache in front keeps both apart


async def test_an_event_stream_is_never_gzipped(gateway: Gateway,
                                                raw: aiohttp.ClientSession) -> None:
    base, upstream = await gateway()
    upstream.chat.events = (b"data: " + sized(50_000) + b"\n\n", DONE)
    url = f"{base}/v1/chat/completions"
    reply = await post(raw, url, {"model": MODEL, "stream": True}, GZIP)
    assert_identity(reply, b"data: " + sized(50_000) + b"\n\ndata: [DONE]\n\n")
    assert "Vary" not in reply[1]


@pytest.mark.parametrize("headers", [
    {"Content-Encoding": "identity"},
    {"Content-Type": "audio/mpeg"},
    {"Cache-Control": "no-transform"},
], ids=["already-encoded", "not-text", "no-transform"])
async def test_answers_the_gateway_must_not_transform_pass_untouched(
    gateway: Gateway, raw: aiohttp.ClientSession, headers: dict[str, str],
) -> None:
    base, upstream = await gateway()
    sent = answering(upstream, sized(50_000), headers=headers)
    reply = await post(raw, f"{base}/v1/chat/completions", {"model": MODEL}, GZIP)
    assert reply[0] == 200
    assert reply[1].get("Content-Encoding") == headers.get("Content-Encoding")
    assert reply[2] == sent
    assert "Vary" not in reply[1]


async def test_an_upstream_gzip_body_is_not_compressed_twice(
    gateway: Gateway, raw: aiohttp.ClientSession,
) -> None:
    base, upstream = await gateway()
    sent = answering(upstream, gzip.compress(sized(50_000)),
                     headers={"Content-Encoding": "gzip"})  # as it compresses itself
    reply = await post(raw, f"{base}/v1/chat/completions", {"model": MODEL}, GZIP)
    assert reply[1]["Content-Encoding"] == "gzip"
    assert reply[2] == sent  # relayed as it came: one gzip layer
    assert gzip.decompress(reply[2]) == sized(50_000)


@pytest.mark.parametrize(("size", "packed"), [(1024, False), (1025, True)])
async def test_answers_up_to_1_kib_are_left_alone(
    gateway: Gateway, raw: aiohttp.ClientSession, size: int, packed: bool,
) -> None:
    base, upstream = await gateway()
    sent = answering(upstream, sized(size))
    reply = await post(raw, f"{base}/v1/chat/completions", {"model": MODEL}, GZIP)
    if packed:
        assert_gzip(reply, sent)
    else:
        assert_identity(reply, sent)
        assert "Vary" not in reply[1]


async def test_error_answers_are_sent_as_the_provider_wrote_them(
    gateway: Gateway, raw: aiohttp.ClientSession,
) -> None:
    base, upstream = await gateway()
    sent = answering(upstream, sized(5000), status=400)
    reply = await post(raw, f"{base}/v1/chat/completions", {"model": MODEL}, GZIP)
    assert_identity(reply, sent, status=400)


async def test_compression_can_be_turned_off(gateway: Gateway,
                                             raw: aiohttp.ClientSession) -> None:
    base, upstream = await gateway(compression={"enabled": False})
    sent = upstream.embeddings.body = embedding_bytes(1)
    reply = await post(raw, f"{base}/v1/embeddings", {"model": MODEL, "input": ["t"]}, GZIP)
    assert_identity(reply, sent)
    assert "Vary" not in reply[1]
    listing = await get(raw, f"{base}/v1/models", GZIP)
    assert "Content-Encoding" not in listing[1]


async def test_cache_hits_and_dedup_followers_are_gzipped_too(
    gateway: Gateway, raw: aiohttp.ClientSession,
) -> None:
    base, upstream = await gateway(cache={"enabled": True})
    sent = answering(upstream, sized(20_000), latency=0.3)
    url = f"{base}/v1/chat/completions"
    payload = {"model": MODEL, "temperature": 0, "messages": []}
    together = await asyncio.gather(*(post(raw, url, payload, GZIP) for _ in range(3)))
    hit = await post(raw, url, payload, GZIP)
    assert upstream.chats == 1
    assert sorted(r[1]["X-Gateway-Dedup"] for r in together) == [
        "follower", "follower", "leader"]
    assert hit[1]["X-Cache"] == "HIT"
    for reply in (*together, hit):
        assert_gzip(reply, sent)


async def test_a_large_gzipped_answer_is_relayed_as_it_arrives(
    gateway: Gateway, raw: aiohttp.ClientSession,
) -> None:
    """Past ``SMALL_ANSWER`` each chunk is compressed and flushed as it comes: the
    client decodes what the upstream sent so far before the rest exists. The upstream's
    hook writes the answer itself: its first ``at`` bytes, then the rest once released."""
    base, upstream = await gateway()
    at, sent, release = SMALL_ANSWER + 50_000, sized(600_000), asyncio.Event()

    async def hold(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(sent[:at])
        await asyncio.wait_for(release.wait(), 5)
        await response.write(sent[at:])
        await response.write_eof()
        return response

    upstream.hook = hold
    url = f"{base}/v1/chat/completions"
    async with raw.post(url, json={"model": MODEL}, headers=GZIP) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        decoder = zlib.decompressobj(31)
        decoded = b""
        while len(decoded) < at:
            chunk = await asyncio.wait_for(response.content.readany(), 5)
            assert chunk, "the answer ended early"
            decoded += decoder.decompress(chunk)
        assert len(decoded) == at  # all of it, and nothing the upstream has not sent
        release.set()
        decoded += decoder.decompress(await response.read()) + decoder.flush()
    assert decoded == sent
    assert decoder.eof


async def test_an_upstream_cut_mid_answer_never_looks_complete(
    gateway: Gateway, raw: aiohttp.ClientSession,
) -> None:
    """The upstream's hook promises 600,000 bytes, sends 400,000 and drops the
    connection."""
    base, upstream = await gateway()
    sent = sized(600_000)

    async def cut(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(sent)
        await response.prepare(request)
        await response.write(sent[:400_000])
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    upstream.hook = cut
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(raw, f"{base}/v1/chat/completions", {"model": MODEL}, GZIP)


async def test_the_openai_sdk_decodes_it_transparently(
    gateway: Gateway, openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    base, upstream = await gateway()
    sent = upstream.embeddings.body = embedding_bytes(16)
    client = openai_client(base)
    response = await client.embeddings.with_raw_response.create(
        model=MODEL, input=["a"] * 16, encoding_format="float")
    assert response.headers["Content-Encoding"] == "gzip"
    result = response.parse()
    expected = orjson.loads(sent)
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
    list by the gateway, is the typical large uncompressed body. (Its own tiny upstream:
    FakeUpstream speaks only OpenAI's API, tests/ollama_fake.py only tiny vectors.)"""
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
