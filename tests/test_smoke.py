"""The first minute of a newcomer: the SDK through the gateway to an upstream."""

from __future__ import annotations

from collections.abc import Callable

import openai

from tests.conftest import MakeConfig, MockUpstream, StartGateway


async def test_chat_through_gateway(
    mock_upstream: MockUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    config = make_config([{"name": "mock", "type": "openai_compat",
                           "base_url": mock_upstream.url}])
    client = openai_client(await start_gateway(config))
    answer = await client.chat.completions.create(
        model="mock-gpt", messages=[{"role": "user", "content": "hello"}])
    assert answer.choices[0].message.content == "Hello from the mock upstream! You said: hello"
    stream = await client.chat.completions.create(
        model="mock/mock-gpt", messages=[{"role": "user", "content": "hello"}], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello from the mock upstream! You said: hello"
