"""The mock upstream (proxy/mock/server.py) speaks OpenAI's wire format and obeys its script.

Other tests lean on this fake, so its promises are pinned here: shapes, SSE framing,
scripted failures, mid-stream disconnects and the cancellation counter.
"""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

import aiohttp
import orjson
import pytest
from pytest_aiohttp import AiohttpClient, AiohttpServer

from proxy.mock.server import STATS_KEY, MockOptions, create_app
from tests.polling import until

CHAT = "/v1/chat/completions"


def _chat_body(**extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ping"}]
    return {"model": "mock-gpt", "messages": messages, **extra}


async def _sse_events(response: aiohttp.ClientResponse, into: list[bytes]) -> None:
    """Collect each ``data:`` payload into ``into`` (so a caller sees them even on errors)."""
    async for line in response.content:
        if line.startswith(b"data: "):
            into.append(line[len(b"data: ") :].rstrip(b"\r\n"))


async def test_models_list_and_lookup(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(MockOptions(models=("a", "org/b"))))
    listed = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == ["a", "org/b"]
    assert listed["data"][1] == {
        "id": "org/b",
        "object": "model",
        "created": 1700000000,
        "owned_by": "mock",
    }
    assert (await (await client.get("/v1/models/org/b")).json())["id"] == "org/b"
    missing = await client.get("/v1/models/nope")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "model_not_found"


async def test_chat_non_stream_echoes_model_and_headers(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app())
    response = await client.post(CHAT, json=_chat_body(), headers={"X-Request-ID": "req-1"})
    assert response.status == 200
    assert response.content_type == "application/json"
    assert response.headers["X-Request-ID"] == "req-1"
    assert response.headers["x-ratelimit-limit-requests"] == "10000"
    assert int(response.headers["openai-processing-ms"]) >= 0
    body = await response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-mock-")
    assert body["model"] == "mock-gpt"
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hello from the mock upstream! You said: ping",
    }
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize(("chunks", "header"), [(8, None), (3, "3")])
async def test_chat_stream_framing(
    aiohttp_client: AiohttpClient, chunks: int, header: str | None
) -> None:
    client = await aiohttp_client(create_app())
    headers = {} if header is None else {"X-Mock-Chunks": header}
    body = _chat_body(stream=True, stream_options={"include_usage": True})
    response = await client.post(CHAT, json=body, headers=headers)
    assert response.content_type == "text/event-stream"
    raw: list[bytes] = []
    await _sse_events(response, raw)

    assert raw[-1] == b"[DONE]"
    events = [orjson.loads(e) for e in raw[:-1]]
    assert len(events) == 1 + chunks + 2  # role, content, stop, usage
    assert {e["id"] for e in events} == {events[0]["id"]}
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"]["content"] for e in events[1 : 1 + chunks])
    assert text == "Hello from the mock upstream! You said: ping"
    assert events[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] > 0


async def test_embeddings_float_and_base64_agree(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(MockOptions(embedding_dim=16)))
    body = {"model": "mock-embed", "input": ["alpha", "beta"]}
    floats = await (await client.post("/v1/embeddings", json=body)).json()
    packed = await (
        await client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})
    ).json()

    assert [d["index"] for d in floats["data"]] == [0, 1]
    vectors = [d["embedding"] for d in floats["data"]]
    assert all(len(v) == 16 for v in vectors)
    assert vectors[0] != vectors[1]
    decoded = [
        list(struct.unpack("<16f", base64.b64decode(d["embedding"]))) for d in packed["data"]
    ]
    assert decoded == vectors
    single = await (await client.post("/v1/embeddings", json={**body, "input": "alpha"})).json()
    assert single["data"][0]["embedding"] == vectors[0]
    assert floats["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


async def test_scripted_429_sends_retry_after(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app())
    response = await client.post(CHAT, json=_chat_body(), headers={"X-Mock-Status": "429"})
    assert response.status == 429
    assert response.headers["Retry-After"] == "1"
    error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("options", "headers", "data", "status"),
    [
        (MockOptions(), {}, b"{not json", 400),
        (MockOptions(), {"X-Mock-Latency": "-1"}, b"{}", 400),
        (MockOptions(error_rate=1.0), {}, orjson.dumps(_chat_body()), 500),
    ],
    ids=["invalid-json", "invalid-header", "injected"],
)
async def test_errors_are_openai_shaped(
    aiohttp_client: AiohttpClient,
    options: MockOptions,
    headers: dict[str, str],
    data: bytes,
    status: int,
) -> None:
    client = await aiohttp_client(create_app(options))
    response = await client.post(CHAT, data=data, headers=headers)
    assert response.status == status
    error = (await response.json())["error"]
    assert isinstance(error["message"], str)
    assert error["param"] is None or isinstance(error["param"], str)


async def test_disconnect_after_cuts_stream_without_done(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app())
    response = await client.post(
        CHAT, json=_chat_body(stream=True), headers={"X-Mock-Disconnect-After": "2"}
    )
    assert response.status == 200
    raw: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        await _sse_events(response, raw)
    assert len(raw) == 1 + 2  # the role chunk and two content chunks, then nothing
    assert b"[DONE]" not in raw


async def test_client_gone_mid_latency_counts_as_cancelled(
    aiohttp_server: AiohttpServer,
) -> None:
    app = create_app()
    server = await aiohttp_server(app)  # handler_cancellation=True, as in main()
    stats = app[STATS_KEY]
    async with aiohttp.ClientSession() as session:
        slow = session.post(
            server.make_url(CHAT), json=_chat_body(), headers={"X-Mock-Latency": "5"}
        )
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(slow, timeout=0.1)
    await until(lambda: stats.cancelled, what="the mock seeing its client gone")
    assert stats.cancelled == 1
    assert stats.in_flight == 0
    assert stats.requests == stats.max_in_flight == 1
