"""Usage accounting (issue 10): every answer's ``usage`` is read into the request's
record, a stream whose client did not ask for it is asked for it upstream and gets
exactly the provider's bytes without it, a stream that ends early records an estimate,
and ``GET /v1/usage`` sums it all. A real gateway app, the OpenAI-like upstream of
tests/usage_fake.py on loopback, the official SDK or aiohttp as the client."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import openai
import orjson
import pytest

from proxy.record import Usage
from tests.conftest import MakeConfig, StartUpstream
from tests.observing import until
from tests.usage_helpers import MESSAGES, REPORTED, STREAM, get_usage, post_raw, usage_gateway

SDK = Callable[..., openai.AsyncOpenAI]


@pytest.mark.parametrize(("split", "null"), [
    ("0", "end"), ("7", "end"), ("5", "middle"), ("length", "end")])
async def test_a_stream_without_include_usage_gets_the_providers_bytes_exactly(
    start_upstream: StartUpstream, make_config: MakeConfig, split: str, null: str,
) -> None:
    headers = {"X-Test-Split": split, "X-Test-Null": null}
    async with usage_gateway(start_upstream, make_config) as (url, upstream, fake, seen):
        direct = await post_raw(upstream, STREAM, headers)
        assert b'"usage"' not in direct
        through = await post_raw(url, STREAM, headers)
        await until(seen, 1)
    assert through == direct
    assert fake.bodies[1]["stream_options"] == {"include_usage": True}  # asked upstream
    assert seen[0].usage == REPORTED


async def test_a_stream_with_include_usage_keeps_its_usage_chunk(
    start_upstream: StartUpstream, make_config: MakeConfig, openai_client: SDK,
) -> None:
    async with usage_gateway(start_upstream, make_config) as (url, upstream, _fake, seen):
        stream = await openai_client(url).chat.completions.create(
            model="m", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        asked = {**STREAM, "stream_options": {"include_usage": True}}
        assert await post_raw(url, asked) == await post_raw(upstream, asked)
        await until(seen, 2)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 7)
    assert [record.usage for record in seen] == [REPORTED, REPORTED]


async def test_answers_of_every_shape_are_read(
    start_upstream: StartUpstream, make_config: MakeConfig, openai_client: SDK,
) -> None:
    """Chat, Responses (JSON and its stream's response.completed) and embeddings."""
    async with usage_gateway(start_upstream, make_config) as (url, _, _fake, seen):
        client = openai_client(url)
        chat = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert chat.usage is not None and chat.usage.total_tokens == 18
        await client.responses.create(model="m", input="hi")
        async with await client.responses.create(model="m", input="hi", stream=True) as s:
            assert [event.type async for event in s][-1] == "response.completed"
        await client.embeddings.create(model="m", input="hi", encoding_format="float")
        await until(seen, 4)
    responses = Usage(5, 4, 1, 0, "reported")
    assert [record.usage for record in seen] == [
        REPORTED, responses, responses, Usage(6, 0, None, None, "reported")]


@pytest.mark.parametrize("ending", ["client_disconnect", "upstream_error", "timeout"])
async def test_a_stream_that_ends_early_records_an_estimate(
    start_upstream: StartUpstream, make_config: MakeConfig, ending: str,
) -> None:
    """Three events reach the client, then: it leaves, the upstream cuts the connection,
    or the upstream goes silent past the read deadline."""
    end = {"client_disconnect": "stall", "upstream_error": "cut", "timeout": "stall"}[ending]
    body = orjson.dumps(STREAM)
    async with (usage_gateway(start_upstream, make_config, timeouts={"read": 0.5}
                              if ending == "timeout" else {}) as (url, _, _fake, seen),
                aiohttp.ClientSession() as session):
        async with session.post(f"{url}/v1/chat/completions", data=body,
                                headers={"Content-Type": "application/json",
                                         "X-Test-End": end}) as response:
            received = b""
            while received.count(b"data:") < 3:
                received += await response.content.readany()
            if ending != "client_disconnect":
                received += await response.content.read()
        await until(seen, 1)
    record = seen[0]
    assert record.ended == ending
    assert record.usage == Usage(len(body) // 4 + 1, 3, None, None, "estimated")
    assert b'"usage"' not in received


async def test_usage_totals_after_known_requests(
    start_upstream: StartUpstream, make_config: MakeConfig, openai_client: SDK,
) -> None:
    async with usage_gateway(start_upstream, make_config) as (url, _, _fake, seen):
        client = openai_client(url)
        await client.chat.completions.create(model="m", messages=MESSAGES)
        await post_raw(url, STREAM)  # the gateway asks for the usage
        await post_raw(url, {**STREAM, "stream_options": {"include_usage": True}})
        await client.responses.create(model="m", input="hi")
        await client.embeddings.create(model="m", input="hi", encoding_format="float")
        cut = orjson.dumps(STREAM)
        assert b"event: error" in await post_raw(url, STREAM, {"X-Test-End": "cut"})
        async with aiohttp.ClientSession() as session, \
                session.get(f"{url}/v1/models") as response:
            assert response.status == 200  # not an answer with usage: not counted
        await until(seen, 7)
        status, totals = await get_usage(url)
    assert status == 200 and totals["object"] == "usage"
    assert (totals["backend"], totals["workers"], totals["complete"]) == ("memory", 1, True)
    assert totals["data"] == [{
        "key": None, "model": "m", "requests": 6,
        "input_tokens": 11 * 3 + 5 + 6 + len(cut) // 4 + 1, "output_tokens": 7 * 3 + 4 + 3,
        "cached_tokens": 3 * 3 + 1, "reasoning_tokens": 2 * 3, "estimated_requests": 1}]
