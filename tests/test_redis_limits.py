"""Per-key rate limits in Redis (issue #4), through real gateways sharing a real
redis-server: one limit across gateway processes, token estimates corrected from
``usage`` for all of them, and the failure policy while Redis is down, then recovery."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.config.keys import hash_secret
from tests.conftest import MakeConfig, StartFake, StartGateway
from tests.keys_helpers import SECRET, USAGE, USED, limited_post
from tests.redis_server import RedisServer, gateway_processes

Reply = tuple[int, "dict[str, str]", bytes]


def raw_config(upstream: str, redis_url: str, redis: dict[str, Any] | None = None,
               **limits: int) -> dict[str, Any]:
    """The YAML file's structure: one limited key, counted in Redis."""
    return {
        "providers": [{"name": "up", "type": "openai_compat", "base_url": f"{upstream}/v1",
                       "models": ["m"]}],
        "auth": {"keys": [{"name": "limited", "sha256": hash_secret(SECRET), **limits}],
                 "limits_backend": "redis"},
        "redis": {"url": redis_url, **(redis or {})},
        "retries": {"max_attempts": 1},
    }


async def test_two_gateway_processes_share_one_requests_limit(
    start_fake: StartFake, redis_server: RedisServer, tmp_path: Any,
) -> None:
    fake = await start_fake(usage=USAGE)
    upstream = fake.url.removesuffix("/v1")
    config = raw_config(upstream, redis_server.url, rpm=4)
    async with gateway_processes(config, tmp_path) as ((a, b), _), aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10)) as session:
        replies = [await limited_post(session, base) for base in (a, b, a, b, a)]
    assert [status for status, _, _ in replies] == [200, 200, 200, 200, 429]
    assert [h["x-ratelimit-remaining-requests"] for _, h, _ in replies] == [
        "3", "2", "1", "0", "0"]
    _, headers, body = replies[4]
    assert 1 <= int(headers["Retry-After"]) <= 15  # one request back in 60 s / 4
    assert headers["x-ratelimit-limit-requests"] == "4"
    assert orjson.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert fake.chats == 4


@pytest.mark.parametrize("stream", [False, True])
async def test_token_estimates_corrected_from_usage_are_shared(
    stream: bool, start_fake: StartFake, start_gateway: StartGateway,
    make_config: MakeConfig, redis_server: RedisServer,
) -> None:
    fake = await start_fake(usage=USAGE)
    raw = raw_config(fake.url.removesuffix("/v1"), redis_server.url, tpm=1000)
    config = make_config(raw.pop("providers"), **raw)
    first_gateway, second_gateway = await start_gateway(config), await start_gateway(config)
    fields: dict[str, Any] = {"max_tokens": 300, "stream": stream}
    async with aiohttp.ClientSession() as session:
        first = await limited_post(session, first_gateway, **fields)
        second = await limited_post(session, second_gateway, **fields)
    assert (first[0], second[0]) == (200, 200)
    guess = 1000 - int(first[1]["x-ratelimit-remaining-tokens"])
    assert 300 < guess < 400
    # The first answer used USED tokens, not its estimate, and the other gateway knows.
    remaining = int(second[1]["x-ratelimit-remaining-tokens"])
    assert 1000 - USED - guess <= remaining <= 1000 - USED - guess + 5, (remaining, guess)


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_redis_down_follows_the_failure_policy_then_limits_come_back(
    policy: str, start_fake: StartFake, start_gateway: StartGateway,
    make_config: MakeConfig, redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    fake = await start_fake(usage=USAGE)
    raw = raw_config(fake.url.removesuffix("/v1"), redis_server.url,
                     {"failure_policy": policy, "retry_interval": 0.2}, rpm=2)
    base = await start_gateway(make_config(raw.pop("providers"), **raw))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        before = await limited_post(session, base)
        redis_server.kill()
        during = []
        for _ in range(4):  # each past retry_interval: four real failures, one warning
            during.append(await limited_post(session, base))
            await asyncio.sleep(0.25)
        redis_server.start()
        await asyncio.sleep(0.5)  # past retry_interval: the next request tries Redis
        after = [await limited_post(session, base) for _ in range(3)]
    assert before[0] == 200 and before[1]["x-ratelimit-remaining-requests"] == "1"
    if policy == "fail_open":  # admitted past the limit of 2, without limit headers
        assert [status for status, _, _ in during] == [200] * 4
        assert not [n for _, h, _ in during for n in h if n.startswith("x-ratelimit")]
    else:
        assert [status for status, _, _ in during] == [503] * 4
        assert {orjson.loads(body)["error"]["code"] for _, _, body in during} == {
            "rate_limit_backend_unavailable"}
        assert {h["Retry-After"] for _, h, _ in during} == {"1"}
    assert fake.chats == 1 + (4 if policy == "fail_open" else 0) + 2
    # The new Redis is empty: the key's bucket is full again, and enforced.
    assert [status for status, _, _ in after] == [200, 200, 429]
    messages = [r.getMessage() for r in caplog.records if r.name == "proxy.redis"]
    outage = [m for m in messages if "is unreachable" in m]
    assert len(outage) == 1 and policy in outage[0], messages
    assert len([m for m in messages if "reachable again" in m]) == 1, messages
