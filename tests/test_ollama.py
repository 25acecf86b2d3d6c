"""The ``ollama`` provider against a fake Ollama server speaking its native API
(issue #2: "chat completions translated both ways, including streaming ... embeddings via
its embed endpoint"), with the official SDK as the client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import MakeConfig, StartGateway, StartUpstream
from tests.ollama_fake import MODEL, VECTORS, FakeOllama

Client = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
async def ollama(start_upstream: StartUpstream, make_config: MakeConfig,
                 start_gateway: StartGateway) -> tuple[FakeOllama, str]:
    """The fake Ollama and a gateway in front of it: (fake, gateway URL)."""
    fake = FakeOllama()
    url = await start_upstream(fake.app())
    config = make_config([{"name": "local", "type": "ollama", "base_url": url}],
                         aliases={"fast": f"local/{MODEL}"})
    return fake, await start_gateway(config)


USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


async def test_chat_is_translated_both_ways(
    ollama: tuple[FakeOllama, str], openai_client: Client,
) -> None:
    fake, gateway = ollama
    answer = await openai_client(gateway).chat.completions.create(
        model=f"local/{MODEL}", messages=USER, temperature=0.5, max_tokens=20, seed=42,
        stop=["\n\n"], response_format={"type": "json_object"})
    assert answer.object == "chat.completion"
    assert answer.model == f"local/{MODEL}"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == "Hello world"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 7)
    assert answer.usage.total_tokens == 12
    path, body = fake.received[0]
    assert path == "/api/chat"
    assert body["model"] == MODEL
    assert body["messages"] == [{"role": "user", "content": "hi"}]
    assert body["stream"] is False
    assert body["options"] == {"temperature": 0.5, "num_predict": 20, "seed": 42,
                               "stop": ["\n\n"]}
    assert body["format"] == "json"


async def test_chat_stream_arrives_chunk_by_chunk(
    ollama: tuple[FakeOllama, str], openai_client: Client,
) -> None:
    fake, gateway = ollama
    fake.interval = 0.2
    stream = await openai_client(gateway).chat.completions.create(
        model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True})
    chunks, arrived = [], []
    async for chunk in stream:
        chunks.append(chunk)
        arrived.append(time.perf_counter())
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == "Hello world"
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    assert [c.choices[0].finish_reason for c in with_choices[:-1]] == [None] * 4
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 7)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert {c.model for c in chunks} == {MODEL}
    # 4 lines 0.2 s apart: the first chunk must not wait for the last line.
    assert arrived[-1] - arrived[0] > 0.45
    assert fake.received[0][1]["stream"] is True


async def _raw_post(gateway: str, path: str, body: dict[str, Any]
                    ) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.post(
            f"{gateway}{path}", json=body) as response:
        return response.status, dict(response.headers), await response.read()


async def test_raw_stream_is_sse_ending_with_done(ollama: tuple[FakeOllama, str]) -> None:
    _, gateway = ollama
    status, headers, raw = await _raw_post(gateway, "/v1/chat/completions",
                                           {"model": "fast", "messages": USER, "stream": True})
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["X-Accel-Buffering"] == "no"
    assert raw.endswith(b"data: [DONE]\n\n")
    assert raw.count(b"data: [DONE]") == 1
    events = [orjson.loads(e[len(b"data: "):]) for e in raw.split(b"\n\n")
              if e.startswith(b"data: {")]
    assert [e["model"] for e in events] == ["fast"] * len(events)


@pytest.mark.parametrize("tail", ["cut", "error"])
async def test_broken_stream_ends_with_error_event(
    ollama: tuple[FakeOllama, str], openai_client: Client, tail: str,
) -> None:
    fake, gateway = ollama
    fake.pieces, fake.tail = ["Hel", "lo"], tail
    stream = await openai_client(gateway).chat.completions.create(
        model=MODEL, messages=USER, stream=True)
    texts = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            texts.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert "".join(texts) == "Hello"
    status, _, raw = await _raw_post(gateway, "/v1/chat/completions",
                                     {"model": MODEL, "messages": USER, "stream": True})
    assert status == 200
    assert b"[DONE]" not in raw
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"event: error\ndata: ")
    assert orjson.loads(last.split(b"data: ", 1)[1])["error"]["message"]


async def test_legacy_completions_use_generate(
    ollama: tuple[FakeOllama, str], openai_client: Client,
) -> None:
    fake, gateway = ollama
    client = openai_client(gateway)
    answer = await client.completions.create(model=MODEL, prompt="Say hi", max_tokens=9)
    assert answer.object == "text_completion"
    assert answer.choices[0].text == "Hello world"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 7)
    stream = await client.completions.create(model=MODEL, prompt="Say hi", stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello world"
    assert chunks[-1].choices[0].finish_reason == "stop"
    paths = [(path, body["prompt"], body["stream"]) for path, body in fake.received]
    assert paths == [("/api/generate", "Say hi", False), ("/api/generate", "Say hi", True)]
    assert fake.received[0][1]["options"] == {"num_predict": 9}


async def test_embeddings_use_embed(ollama: tuple[FakeOllama, str], openai_client: Client,
                                    ) -> None:
    fake, gateway = ollama
    answer = await openai_client(gateway).embeddings.create(
        model=f"local/{MODEL}", input=["one", "two"], encoding_format="float")
    assert [d.embedding for d in answer.data] == VECTORS
    assert [d.index for d in answer.data] == [0, 1]
    assert (answer.usage.prompt_tokens, answer.usage.total_tokens) == (4, 4)
    assert fake.received == [("/api/embed", {"model": MODEL, "input": ["one", "two"]})]


async def test_models_unknown_model_and_alias(
    ollama: tuple[FakeOllama, str], openai_client: Client,
) -> None:
    fake, gateway = ollama
    client = openai_client(gateway)
    listed = {m.id: m.owned_by for m in (await client.models.list()).data}
    assert listed == {MODEL: "local", "fast": "local"}
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="local/nope", messages=USER)
    assert caught.value.code == "model_not_found"
    assert 'model "nope" not found' in caught.value.message
    bare = await client.chat.completions.create(model=MODEL, messages=USER)
    alias = await client.chat.completions.create(model="fast", messages=USER)
    assert (bare.model, alias.model) == (MODEL, "fast")
    assert alias.choices[0].message.content == "Hello world"
    assert [body["model"] for _, body in fake.received] == ["nope", MODEL, MODEL]


async def test_unsupported_endpoint_is_400(ollama: tuple[FakeOllama, str],
                                           openai_client: Client) -> None:
    fake, gateway = ollama
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client(gateway).images.generate(model=f"local/{MODEL}", prompt="a cat")
    assert caught.value.code == "unsupported_endpoint"
    status, _, raw = await _raw_post(gateway, "/v1/images/generations",
                                     {"model": f"local/{MODEL}", "prompt": "a cat"})
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "unsupported_endpoint")
    assert fake.received == []


async def test_images_and_tool_calls(ollama: tuple[FakeOllama, str],
                                     openai_client: Client) -> None:
    fake, gateway = ollama
    fake.tool_calls = [{"function": {"name": "lookup", "arguments": {"city": "Oslo"}}}]
    messages: list[Any] = [
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "lookup", "arguments": '{"city": "Bergen"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rainy"},
    ]
    tools: list[Any] = [{"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    answer = await openai_client(gateway).chat.completions.create(
        model=MODEL, messages=messages, tools=tools)
    sent = fake.received[0][1]
    assert sent["messages"][0] == {"role": "user", "content": "What is this?",
                                   "images": ["AAAA"]}
    assert sent["messages"][1]["tool_calls"] == [
        {"function": {"name": "lookup", "arguments": {"city": "Bergen"}}}]
    assert sent["messages"][2]["role"] == "tool"
    assert sent["messages"][2]["content"] == "rainy"
    assert sent["tools"] == tools
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
