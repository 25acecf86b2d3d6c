"""The response cache in Redis (issue #4): an answer one gateway process stored is served
by another from Redis, streamed or not, with no second upstream call; and with Redis
down, or an entry that cannot be read, requests are still answered, from the upstream."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cache_helpers import CHAT, answer_id, chat, post, sse
from tests.conftest import MakeConfig, StartFake, StartGateway
from tests.redis_server import RedisServer, gateway_processes

HEAD = b'[200, "OK", [["Content-Type", "application/json"]]]'


async def test_gateway_processes_share_the_cache_and_redis_down_is_a_miss(
    start_fake: StartFake, redis_server: RedisServer, tmp_path: Path,
) -> None:
    upstream = await start_fake()
    config: dict[str, Any] = {
        "providers": [upstream.provider()],
        "cache": {"backend": "redis", "ttl": 60},
        "redis": {"url": redis_server.url, "retry_interval": 0.2},
        "retries": {"max_attempts": 1},
    }
    streamed = chat(temperature=0, stream=True)
    async with gateway_processes(config, tmp_path) as ((a, b), processes), \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        first = await post(session, a + CHAT, chat(temperature=0))
        second = await post(session, b + CHAT, chat(temperature=0))
        assert upstream.chats == 1
        first_stream = await post(session, a + CHAT, streamed)
        second_stream = await post(session, b + CHAT, streamed)
        assert upstream.chats == 2
        redis_server.kill()
        during = [await post(session, gateway + CHAT, chat(temperature=0))
                  for gateway in (b, a)]
        logs = [p.log.read_text() for p in processes]
    assert [first[1]["X-Cache"], second[1]["X-Cache"]] == ["MISS", "HIT"]
    assert answer_id(second) == "answer-1" and first[2] == second[2]
    assert second[1]["Content-Type"].startswith("application/json")
    expected = sse(2, "one") + sse(2, " two") + sse(2, " three") + b"data: [DONE]\n\n"
    assert (first_stream[2], second_stream[2]) == (expected, expected)
    assert second_stream[1]["X-Cache"] == "HIT"
    assert second_stream[1]["Content-Type"].startswith("text/event-stream")
    # Redis down: answered from the upstream, never an error.
    assert [(status, h["X-Cache"]) for status, h, _ in during] == [(200, "MISS")] * 2
    assert [answer_id(reply) for reply in during] == ["answer-3", "answer-4"]
    assert all("redis redis://127.0.0.1" in log and "is unreachable" in log for log in logs)


def frame(head: bytes, body: bytes = b"{}", version: bytes = b"\x01") -> bytes:
    return version + len(head).to_bytes(4, "big") + head + body


@pytest.mark.parametrize("garbage", [
    frame(b'[200, "OK", [["Content-Type"]]]'),  # a header pair of one
    frame(b'"abc"'),  # three characters unpack as status, reason and headers
    frame(b'["200", "OK", []]'),  # a status that is not a number
    frame(b'[200, "OK", [["X-A", "1\\r\\nX-B: 2"]]]'),  # a header aiohttp refuses
    frame(HEAD, version=b"\x07"),  # another version
    frame(HEAD)[:20],  # truncated in the head
    b"\x01\xff\xff\xff\xff" + HEAD,  # a head longer than the entry
    b"\x01",
], ids=["pair", "string", "status", "newline", "version", "truncated", "length", "short"])
async def test_an_unreadable_entry_is_a_miss_served_from_upstream(
    garbage: bytes, start_fake: StartFake, start_gateway: StartGateway,
    make_config: MakeConfig, redis_server: RedisServer, caplog: pytest.LogCaptureFixture,
) -> None:
    import redis.asyncio  # noqa: PLC0415 - an optional extra

    upstream = await start_fake()
    url = await start_gateway(make_config([upstream.provider()],
                                          cache={"backend": "redis", "ttl": 60},
                                          redis={"url": redis_server.url})) + CHAT
    client = redis.asyncio.Redis.from_url(redis_server.url)
    async with client, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10)) as session:
        first = await post(session, url, chat(temperature=0))
        [key] = await client.keys("proxy:cache:*")
        await client.set(key, garbage)
        with caplog.at_level(logging.WARNING):
            second = await post(session, url, chat(temperature=0))
            third = await post(session, url, chat(temperature=0))  # stored again
    assert [(r[0], r[1]["X-Cache"]) for r in (first, second, third)] == [
        (200, "MISS"), (200, "MISS"), (200, "HIT")]
    assert [answer_id(r) for r in (second, third)] == ["answer-2", "answer-2"]
    assert upstream.chats == 2
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("proxy")]
    assert len([w for w in warnings if "cannot be read" in w]) == 1, warnings
    assert not [w for w in warnings if "abc" in w or "Content-Type" in w]
