"""The official ``openai`` SDK, async and sync, through the gateway to the mock upstream.

Issue #2: "a person can point the official openai SDK ... at the gateway instead of the
provider and everything works the same". Each endpoint the issue names is called the way
an application calls it, and the answer is compared with what the mock upstream says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from proxy.mock.payloads import GREETING, embedding_vector
from tests.conftest import MakeConfig, MockUpstream, StartGateway

AsyncClientFactory = Callable[..., openai.AsyncOpenAI]
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def gateway(mock_upstream: MockUpstream, make_config: MakeConfig,
                  start_gateway: StartGateway) -> str:
    """A gateway with one provider, the mock upstream, under the name ``mock``."""
    config = make_config([{"name": "mock", "type": "openai_compat",
                           "base_url": mock_upstream.url}])
    return await start_gateway(config)


@pytest.fixture
def client(gateway: str, openai_client: AsyncClientFactory) -> openai.AsyncOpenAI:
    return openai_client(gateway)


async def test_chat_completion_async(client: openai.AsyncOpenAI,
                                     mock_upstream: MockUpstream) -> None:
    answer = await client.chat.completions.create(model="mock-gpt", messages=HELLO)
    assert answer.object == "chat.completion"
    assert answer.model == "mock-gpt"
    assert answer.id.startswith("chatcmpl-mock-")
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == f"{GREETING}hello"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == len(f"{GREETING}hello".split())
    assert mock_upstream.stats.requests >= 1


async def test_chat_completion_sync_client(gateway: str) -> None:
    def call() -> str | None:
        with openai.OpenAI(base_url=f"{gateway}/v1", api_key="sk-sync", max_retries=0,
                           timeout=10) as sync_client:
            answer = sync_client.chat.completions.create(
                model="mock-gpt", messages=[{"role": "user", "content": "from a thread"}])
            return answer.choices[0].message.content

    assert await asyncio.to_thread(call) == f"{GREETING}from a thread"


async def test_sync_client_streams(gateway: str) -> None:
    def call() -> list[str]:
        with openai.OpenAI(base_url=f"{gateway}/v1", api_key="sk-sync", max_retries=0,
                           timeout=10) as sync_client:
            stream = sync_client.chat.completions.create(
                model="mock-gpt", messages=HELLO, stream=True)
            return [c.choices[0].delta.content or "" for c in stream if c.choices]

    pieces = await asyncio.to_thread(call)
    assert "".join(pieces) == f"{GREETING}hello"
    assert len([p for p in pieces if p]) == 8  # the mock's default chunk count


async def test_legacy_completion(client: openai.AsyncOpenAI) -> None:
    answer = await client.completions.create(model="mock-gpt", prompt="say hi")
    assert answer.object == "text_completion"
    assert answer.choices[0].text == f"{GREETING}say hi"
    assert answer.id.startswith("cmpl-mock-")


async def test_embeddings_base64_default(client: openai.AsyncOpenAI) -> None:
    # The SDK asks for base64 when no encoding_format is given and decodes it itself.
    answer = await client.embeddings.create(model="mock-embed", input=["alpha", "beta"])
    assert answer.model == "mock-embed"
    assert [d.index for d in answer.data] == [0, 1]
    for item, text in zip(answer.data, ["alpha", "beta"], strict=True):
        assert item.embedding == list(embedding_vector(orjson.dumps(text), 8)[0])


async def test_embeddings_float(client: openai.AsyncOpenAI) -> None:
    raw = await client.embeddings.with_raw_response.create(
        model="mock-embed", input="alpha", encoding_format="float")
    assert isinstance(orjson.loads(raw.content)["data"][0]["embedding"], list)
    answer = raw.parse()
    assert answer.data[0].embedding == list(embedding_vector(orjson.dumps("alpha"), 8)[0])
    assert answer.usage.prompt_tokens == 1


async def test_responses_create(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="mock-gpt", input="what is new?",
                                             instructions="be brief")
    assert response.id.startswith("resp_mock_")
    assert response.status == "completed"
    assert response.output_text == f"{GREETING}what is new?"
    assert response.usage is not None
    assert response.usage.input_tokens == 5  # words of instructions + input


async def test_models_list_uses_bare_ids(client: openai.AsyncOpenAI) -> None:
    ids = [model.id async for model in client.models.list()]
    assert sorted(ids) == ["mock-embed", "mock-gpt"]


async def test_models_retrieve(client: openai.AsyncOpenAI) -> None:
    model = await client.models.retrieve("mock-gpt")
    assert model.id == "mock-gpt"
    assert model.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("no-such-model")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


async def test_unknown_model_is_not_found(client: openai.AsyncOpenAI,
                                          mock_upstream: MockUpstream) -> None:
    await client.models.list()  # discovery done: the 404 below is the router's answer
    before = mock_upstream.stats.requests
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert mock_upstream.stats.requests == before


async def test_upstream_rate_limit_is_rate_limit_error(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="mock-gpt", messages=HELLO,
                                             extra_headers={"X-Mock-Status": "429"})
    error = caught.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "1"
    assert error.code == "rate_limit_exceeded"
    assert error.body == {"message": "scripted failure (X-Mock-Status: 429)",
                          "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    assert error.response.headers["x-ratelimit-limit-requests"] == "10000"


async def test_upstream_server_error_keeps_status(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="mock-gpt", messages=HELLO,
                                             extra_headers={"X-Mock-Status": "503"})
    assert caught.value.status_code == 503
    assert caught.value.body == {"message": "scripted failure (X-Mock-Status: 503)",
                                 "type": "server_error", "param": None, "code": None}


async def test_custom_response_headers_pass_through(client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(
        model="mock-gpt", messages=HELLO)
    assert raw.status_code == 200
    assert raw.headers["x-ratelimit-limit-requests"] == "10000"
    assert int(raw.headers["openai-processing-ms"]) >= 0
    assert raw.parse().choices[0].message.content == f"{GREETING}hello"


async def test_request_id_returned(client: openai.AsyncOpenAI) -> None:
    given = await client.chat.completions.with_raw_response.create(
        model="mock-gpt", messages=HELLO, extra_headers={"X-Request-ID": "sdk-req-42"})
    assert given.headers["x-request-id"] == "sdk-req-42"
    # The mock echoes the id it received: no differing upstream id means it got ours.
    assert "x-upstream-request-id" not in given.headers
    first = await client.chat.completions.with_raw_response.create(
        model="mock-gpt", messages=HELLO)
    second = await client.chat.completions.with_raw_response.create(
        model="mock-gpt", messages=HELLO)
    assert first.headers["x-request-id"]
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
