"""Per-key rate limits (issue #4): requests and tokens per minute, 429 with Retry-After
and OpenAI's ``x-ratelimit-*`` headers, token estimates corrected from ``usage`` (JSON
answers and a stream's final usage chunk), through the real gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from proxy.config.keys import hash_secret
from proxy.resilience.ratelimit import MemoryBuckets, _duration, estimate
from tests.conftest import MakeConfig, StartFake, StartGateway, StartUpstream
from tests.fake_upstream import FakeUpstream
from tests.keys_helpers import SECRET, USAGE, USED, limited_post

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


async def gateway(start_fake: StartFake, start_gateway: StartGateway,
                  make_config: MakeConfig, **limits: int) -> tuple[str, FakeUpstream]:
    """(gateway URL, upstream): one key limited by ``limits``, answers reporting ``USED``."""
    upstream = await start_fake(usage=USAGE)
    key = {"name": "limited", "sha256": hash_secret(SECRET), **limits}
    return await start_gateway(make_config([upstream.provider()],
                                           auth={"keys": [key]})), upstream


async def test_requests_per_minute_then_429_with_retry_after(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    base, upstream = await gateway(start_fake, start_gateway, make_config, rpm=2)
    async with aiohttp.ClientSession() as session:
        replies = [await limited_post(session, base) for _ in range(3)]
    assert [status for status, _, _ in replies] == [200, 200, 429]
    assert [h["x-ratelimit-remaining-requests"] for _, h, _ in replies] == ["1", "0", "0"]
    assert {h["x-ratelimit-limit-requests"] for _, h, _ in replies} == {"2"}
    assert replies[0][1]["x-ratelimit-reset-requests"].endswith("s")
    _, headers, body = replies[2]
    assert 1 <= int(headers["Retry-After"]) <= 30  # one request back in 60 s / 2
    error = orjson.loads(body)["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert upstream.chats == 2
    with pytest.raises(openai.RateLimitError):
        await openai_client(base, api_key=SECRET).chat.completions.create(
            model="m", messages=MESSAGES)


@pytest.mark.parametrize("stream", [False, True])
async def test_token_estimates_are_corrected_from_usage(
    stream: bool, start_fake: StartFake, start_gateway: StartGateway,
    make_config: MakeConfig,
) -> None:
    base, _ = await gateway(start_fake, start_gateway, make_config, tpm=1000)
    fields: dict[str, Any] = {"max_tokens": 300, "stream": stream}
    async with aiohttp.ClientSession() as session:
        first = await limited_post(session, base, **fields)
        second = await limited_post(session, base, **fields)
    assert (first[0], second[0]) == (200, 200)
    assert first[1]["x-ratelimit-limit-tokens"] == "1000"
    guess = 1000 - int(first[1]["x-ratelimit-remaining-tokens"])
    assert 300 < guess < 400  # max_tokens plus the prompt's size / 4
    # The first answer used USED tokens, not its estimate: the difference came back.
    remaining = int(second[1]["x-ratelimit-remaining-tokens"])
    assert 1000 - USED - guess <= remaining <= 1000 - USED - guess + 5, (remaining, guess)


async def test_over_the_token_limit_is_429_and_the_request_slot_is_kept(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    base, upstream = await gateway(start_fake, start_gateway, make_config, rpm=5, tpm=100)
    async with aiohttp.ClientSession() as session:
        first = await limited_post(session, base, max_tokens=5000)  # a full bucket admits it
        second = await limited_post(session, base, max_tokens=5000)
        third = await limited_post(session, base, max_tokens=1)
    assert first[0] == 200
    assert second[0] == 429
    assert "tokens per minute" in orjson.loads(second[2])["error"]["message"]
    assert int(second[1]["Retry-After"]) >= 1
    assert third[0] == 429 or third[0] == 200
    # The refused request did not use up a request: 5 - 1 (first) - 1 (third) left.
    assert third[1]["x-ratelimit-remaining-requests"] == "3"
    assert upstream.chats == 1 + (third[0] == 200)


async def test_unlimited_keys_get_no_rate_headers(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    base, _ = await gateway(start_fake, start_gateway, make_config)
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await limited_post(session, base)
    assert status == 200
    assert not [name for name in headers if name.lower().startswith("x-ratelimit")]


async def test_buckets_refill_continuously() -> None:
    now = [0.0]
    buckets = MemoryBuckets(clock=lambda: now[0])
    assert (await buckets.take([("k", 60, 60)]))[0] is None
    refused, [state] = await buckets.take([("k", 60, 1)])
    assert refused == 0 and state.remaining == 0 and state.reset == 60
    now[0] = 10.0  # 60 per minute: 10 back after 10 s
    refused, [state] = await buckets.take([("k", 60, 10)])
    assert refused is None and state.remaining == 0
    await buckets.give("k", 60, 100)  # never above the limit
    assert (await buckets.take([("k", 60, 0)]))[1][0].remaining == 60
    # All or nothing: the second bucket has too little, so the first keeps its 60.
    refused, states = await buckets.take([("k", 60, 1), ("j", 5, 6)])
    assert refused == 1 and [s.remaining for s in states] == [60, 5]


@pytest.mark.parametrize(("seconds", "text"), [
    (0.25, "250ms"), (1, "1s"), (6.5, "6.5s"), (360, "6m0s"), (90, "1m30s")])
def test_reset_times_in_openais_format(seconds: float, text: str) -> None:
    assert _duration(seconds) == text


def test_the_estimate_counts_the_prompt_and_the_allowed_completion() -> None:
    body = b"x" * 400
    assert estimate(None, body) == 101
    assert estimate({"max_tokens": 50}, body) == 151
    assert estimate({"max_completion_tokens": 70, "max_tokens": 50}, body) == 171
    assert estimate({"max_output_tokens": 9}, body) == 110


async def test_a_request_the_gateway_fails_costs_no_tokens(
    start_gateway: StartGateway, make_config: MakeConfig, closed_port: int,
) -> None:
    """502s from a dead upstream must not drain the key's token budget into 429s."""
    key = {"name": "limited", "sha256": hash_secret(SECRET), "tpm": 1000}
    base = await start_gateway(make_config(
        [{"name": "up", "type": "openai_compat", "models": ["m"],
          "base_url": f"http://127.0.0.1:{closed_port}/v1"}],
        auth={"keys": [key]}, breaker={"failures": 0}))
    async with aiohttp.ClientSession() as session:
        statuses = [(await limited_post(session, base, max_tokens=600))[0] for _ in range(3)]
    assert statuses == [502, 502, 502]


async def test_an_answer_a_deadline_cut_keeps_its_token_estimate(
    start_upstream: StartUpstream, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    """The upstream worked (and billed) before its body stalled: the key is charged."""
    async def stalling(request: web.Request) -> web.StreamResponse:
        """Part of a promised body, then nothing (wire bytes: not FakeUpstream's)."""
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/json",
                                               "Content-Length": "100"})
        await response.prepare(request)
        await response.write(b'{"id": "c", ')
        await asyncio.sleep(5)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stalling)
    url = await start_upstream(app)
    key = {"name": "limited", "sha256": hash_secret(SECRET), "tpm": 1000}
    base = await start_gateway(make_config(
        [{"name": "up", "type": "openai_compat", "base_url": f"{url}/v1", "models": ["m"]}],
        auth={"keys": [key]}, timeouts={"read": 0.3}, cache={"enabled": False}))
    async with aiohttp.ClientSession() as session:
        statuses = [(await limited_post(session, base, max_tokens=600))[0] for _ in range(2)]
    assert statuses == [504, 429]
