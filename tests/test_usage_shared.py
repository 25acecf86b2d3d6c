"""Usage accounting with gateway keys and shared answers (issue 10): who sees which
totals on ``GET /v1/usage``, and a cached or deduplicated stream serving a client that
asked for its usage and one that did not, each with the bytes it would have had from
the provider. A real gateway app and the upstream of tests/usage_fake.py on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.config.loader import ConfigError
from proxy.record import Usage
from tests import polling
from tests.conftest import MakeConfig, StartUpstream
from tests.observing import observed, until
from tests.ollama_fake import MODEL, FakeOllama
from tests.usage_helpers import (
    KEYS,
    REPORTED,
    SECRETS,
    STREAM,
    get_usage,
    post_raw,
    row,
    usage_gateway,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi there"}]}
ASKED = {**STREAM, "stream_options": {"include_usage": True}}


async def test_a_key_sees_its_own_totals_and_an_admin_key_every_keys(
    start_upstream: StartUpstream, make_config: MakeConfig,
) -> None:
    async with usage_gateway(start_upstream, make_config, auth={"keys": KEYS}) \
            as (url, _, _fake, seen):
        for name, count in (("alice", 1), ("bob", 2)):
            for _ in range(count):
                await post_raw(url, CHAT, {"Authorization": f"Bearer {SECRETS[name]}"})
        await until(seen, 3)
        alice, bob, ops = [await get_usage(url, SECRETS[n]) for n in ("alice", "bob", "ops")]
        nobody = await get_usage(url)
        wrong = await get_usage(url, "sk-gw-nobody")
    assert alice == (200, {**alice[1], "data": [row("alice", 1)]})
    assert bob[1]["data"] == [row("bob", 2)]
    assert ops[1]["data"] == [row("alice", 1), row("bob", 2)]
    assert nobody[0] == wrong[0] == 401
    assert "error" in nobody[1] and "error" in wrong[1]
    assert "sk-gw" not in orjson.dumps([alice, bob, ops, nobody, wrong]).decode()


async def test_a_cached_stream_serves_a_client_that_did_not_ask_for_usage(
    start_upstream: StartUpstream, make_config: MakeConfig,
) -> None:
    """The first client asks (its answer is cached with the usage chunk); the second
    did not: the cache hit is taken out of what it never asked for."""
    deterministic = {**STREAM, "temperature": 0}
    async with usage_gateway(start_upstream, make_config, cache={"enabled": True}) \
            as (url, upstream, fake, seen):
        direct = await post_raw(upstream, deterministic)
        direct_asked = await post_raw(upstream, {**deterministic, **_ask()})
        assert await post_raw(url, {**deterministic, **_ask()}) == direct_asked
        assert await post_raw(url, deterministic) == direct
        await until(seen, 2)
    assert len(fake.bodies) == 3  # two direct calls, one through the gateway
    assert [(r.cache, r.usage) for r in seen] == [("miss", REPORTED), ("hit", REPORTED)]


async def test_one_shared_upstream_stream_serves_both_kinds_of_client(
    start_upstream: StartUpstream, make_config: MakeConfig,
) -> None:
    """Identical deterministic streams in flight together share one upstream call
    (asked for its usage): each client gets what it asked for."""
    deterministic = {**STREAM, "temperature": 0}
    slow = {"X-Test-Delay": "1.0"}  # long enough for both to meet on a loaded machine
    async with usage_gateway(start_upstream, make_config) as (url, upstream, fake, seen):
        direct = await post_raw(upstream, deterministic)
        direct_asked = await post_raw(upstream, {**deterministic, **_ask()})
        plain, asked = await asyncio.gather(
            post_raw(url, deterministic, slow),
            _once(lambda: len(fake.bodies) == 3,  # the leader's call is under way
                  post_raw(url, {**deterministic, **_ask()}, slow)))
        await until(seen, 2)
    assert (plain, asked) == (direct, direct_asked)
    assert len(fake.bodies) == 3  # two direct calls, one shared through the gateway
    assert sorted(str(r.dedup) for r in seen) == ["follower", "leader"]
    assert [r.usage for r in seen] == [REPORTED, REPORTED]


def _ask() -> dict[str, Any]:
    return {"stream_options": {"include_usage": True}}


async def _once(ready: Callable[[], bool], call: Awaitable[bytes]) -> bytes:
    """``call``, sent once ``ready()`` (polled, bounded)."""
    await polling.until(ready, what="the leader's call at the upstream")
    return await call


async def test_the_usage_route_is_not_proxied(
    start_upstream: StartUpstream, make_config: MakeConfig,
) -> None:
    async with usage_gateway(start_upstream, make_config) as (url, _, fake, _seen), \
            aiohttp.ClientSession() as session, session.get(f"{url}/v1/usage") as response:
        assert response.status == 200
        assert (await response.json())["data"] == []
    assert fake.bodies == []


async def test_an_ollama_stream_is_counted_and_its_client_gets_no_usage_chunk(
    start_upstream: StartUpstream, make_config: MakeConfig,
) -> None:
    """Ollama always reports its counts; the translation's usage chunk, asked for by
    the gateway, never reaches a client that did not ask for it."""
    fake = FakeOllama()
    upstream = await start_upstream(fake.app())
    config = make_config([{"name": "local", "type": "ollama", "base_url": upstream}],
                         cache={"enabled": False})
    body = {"model": f"local/{MODEL}", "stream": True, "messages": CHAT["messages"]}
    async with observed(config) as (url, seen):
        plain = await post_raw(url, body)
        asked = await post_raw(url, {**body, **_ask()})
        await until(seen, 2)
    assert b'"usage"' not in plain and plain.endswith(b"data: [DONE]\n\n")
    assert b'"usage":{"prompt_tokens":5,"completion_tokens":7' in asked
    assert plain.count(b"data:") == asked.count(b"data:") - 1
    assert [r.usage for r in seen] == [Usage(5, 7, None, None, "reported")] * 2


async def test_counting_never_waits_for_an_unreachable_redis(
    start_upstream: StartUpstream, make_config: MakeConfig, closed_port: int,
) -> None:
    """Answers flow while Redis is down; only /v1/usage says it cannot answer."""
    redis = {"url": f"redis://127.0.0.1:{closed_port}/0", "retry_interval": 0.05}
    async with usage_gateway(start_upstream, make_config, redis=redis,
                             usage={"backend": "redis", "flush_interval": 0.05}) \
            as (url, _, _fake, seen), aiohttp.ClientSession() as session:
        await post_raw(url, CHAT)
        await until(seen, 1)
        async with session.get(f"{url}/v1/usage") as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"]["code"] == "usage_unavailable"


def test_a_redis_usage_backend_needs_a_redis_url(make_config: MakeConfig) -> None:
    with pytest.raises(ConfigError) as raised:
        make_config([], usage={"backend": "redis"})
    assert "redis.url: is required when usage.backend is redis" in raised.value.problems
    with pytest.raises(ConfigError) as raised:
        make_config([], usage={"backend": "disk", "flush_interval": 0, "other": 1})
    assert {p.split(":")[0] for p in raised.value.problems} == {
        "usage.backend", "usage.flush_interval", "usage.other"}
