"""The key under which requests share an upstream call (dedup) or a cached answer.

Issue #3: "The key covers everything that changes the answer: the caller's identity [...],
provider, path, and the request body canonicalised". Two requests that differ only in
the provider they are routed to, in their path, or in their query string must never share;
identical ones must. Each upstream answer names its provider, call number and the path
and query it was asked for, so a shared answer shows in the body as well as in the count.

The provider cannot be varied with ``provider/model`` names: the body would differ too
and hide a key without the provider. Instead two discovering providers serve the same
model name, and the catalog is refreshed (``GET /health`` with ``health_cache_ttl: 0``)
after the first one starts serving it, which moves the identical request to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import StartFake, StartLive
from tests.fake_upstream import CHAT, COMPLETIONS, MODELS, FakeUpstream, Reply, Seen, replaced
from tests.polling import until
from tests.running import RunningGateway

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi",
        "temperature": 0}
Answer = tuple[int, "dict[str, str]", bytes]
# Only one way of sharing at a time, so each test shows that one's key.
DEDUP_ONLY = {"cache": {"enabled": False}}
CACHE_ONLY = {"dedup": {"mode": "off"}}
Upstream = tuple[str, FakeUpstream]  # a provider's name and its fake upstream


@pytest.fixture
def upstream(start_fake: StartFake) -> Callable[..., Any]:
    """``await upstream(name, models=("m",), delay=0.2)`` -> a fake upstream whose chat
    and completions answers come after ``delay`` s and name it (``{name}-{call}``) and the
    path and query it was asked."""
    async def start(name: str, models: tuple[str, ...] = ("m",), delay: float = 0.2
                    ) -> Upstream:
        fake = await start_fake(models, latency=delay)
        fake.completions.latency = delay

        async def naming(request: web.Request, seen: Seen) -> Reply | None:
            if seen.path == MODELS:
                return None
            reply = fake.chat if seen.path == CHAT else fake.completions
            return replaced(reply, body={"id": f"{name}-{seen.call}", "asked": seen.path_qs})

        fake.hook = naming
        return name, fake

    return start


def asked(fake: FakeUpstream) -> list[str]:
    """The path and query of each inference call, in order."""
    return [seen.path_qs for seen in fake.requests if seen.path != MODELS]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        yield client


@pytest.fixture
def gateway(live_gateway: StartLive) -> Callable[..., Any]:
    """``await gateway([upstream, ...], static=..., **raw)`` -> the live gateway (its
    in-flight map in reach). With ``static`` each provider lists its models in the
    config, else they are discovered."""
    async def start(upstreams: list[Upstream], static: bool = True,
                    **raw: Any) -> RunningGateway:
        return await live_gateway(*(fake.provider(name, discover=not static)
                                    for name, fake in upstreams), **raw)

    return start


async def post(session: aiohttp.ClientSession, url: str,
               body: dict[str, Any] = BODY) -> Answer:
    async with session.post(url, data=orjson.dumps(body),
                            headers={"Content-Type": "application/json"}) as response:
        return response.status, dict(response.headers), await response.read()


def answer(reply: Answer) -> tuple[str, str]:
    """(answer id, the path and query the upstream was asked), of a 200 reply."""
    assert reply[0] == 200, reply
    body = orjson.loads(reply[2])
    return body["id"], body["asked"]


async def serve_model_from(session: aiohttp.ClientSession, base: str, upstream: Upstream
                           ) -> None:
    """``upstream`` starts serving ``m``; refresh the gateway's catalog now."""
    name, fake = upstream
    fake.model_ids = ["m"]
    async with session.get(base + "/health") as response:
        assert response.status == 200
        body = await response.json()
    assert {p["name"]: p["models"] for p in body["providers"]}[name] == 1


async def test_requests_routed_to_another_provider_never_join_its_call(
    gateway: Callable[..., Any], upstream: Callable[..., Any],
    session: aiohttp.ClientSession,
) -> None:
    first = await upstream("first", models=(), delay=0)
    second = await upstream("second", delay=0.6)
    live = await gateway([first, second], static=False, health_cache_ttl=0, **DEDUP_ONLY)
    base, url = live.url, live.url + CHAT
    in_flight = [asyncio.create_task(post(session, url))]
    try:
        await until(lambda: bool(second[1].chats))
        in_flight.append(asyncio.create_task(post(session, url)))  # identical: joins
        await live.until(lambda: live.inflight.followed == 1, what="the second one joining")
        await serve_model_from(session, base, first)  # "m" now routes to "first"
        to_first = await post(session, url)
        assert not any(task.done() for task in in_flight), "the call to 'second' ended"
        replies = [*await asyncio.wait_for(asyncio.gather(*in_flight), 5), to_first]
    finally:
        for task in in_flight:
            task.cancel()
    assert [answer(r)[0] for r in replies] == ["second-1", "second-1", "first-1"]
    assert [r[1]["X-Gateway-Dedup"] for r in replies] == ["leader", "follower", "leader"]
    assert (first[1].chats, second[1].chats) == (1, 1)


async def test_a_cached_answer_is_never_replayed_for_another_provider(
    gateway: Callable[..., Any], upstream: Callable[..., Any],
    session: aiohttp.ClientSession,
) -> None:
    first = await upstream("first", models=(), delay=0)
    second = await upstream("second", delay=0)
    base = (await gateway([first, second], static=False, health_cache_ttl=0, **CACHE_ONLY)).url
    url = base + CHAT
    replies = [await post(session, url), await post(session, url)]
    await serve_model_from(session, base, first)
    replies += [await post(session, url), await post(session, url)]
    assert [answer(r)[0] for r in replies] == ["second-1", "second-1", "first-1", "first-1"]
    assert [r[1]["X-Cache"] for r in replies] == ["MISS", "HIT", "MISS", "HIT"]
    assert (first[1].chats, second[1].chats) == (1, 1)


VARIANTS = {
    "path": [CHAT, COMPLETIONS],
    "query": [CHAT, f"{CHAT}?api-version=1", f"{CHAT}?api-version=2"],
}


@pytest.mark.parametrize("differs", VARIANTS)
async def test_in_flight_requests_differing_in_path_or_query_never_share(
    gateway: Callable[..., Any], upstream: Callable[..., Any],
    session: aiohttp.ClientSession, differs: str,
) -> None:
    """Every variant twice at once: the identical pair shares one call, no two variants do."""
    up = await upstream("up")
    base = (await gateway([up], **DEDUP_ONLY)).url
    paths = VARIANTS[differs]
    replies = await asyncio.gather(*(post(session, base + path)
                                     for path in paths for _ in range(2)))
    assert sorted(asked(up[1])) == sorted(paths)
    for index, path in enumerate(paths):
        pair = replies[2 * index:2 * index + 2]
        assert [answer(r)[1] for r in pair] == [path, path]
        assert answer(pair[0])[0] == answer(pair[1])[0]
        assert sorted(r[1]["X-Gateway-Dedup"] for r in pair) == ["follower", "leader"]


@pytest.mark.parametrize("differs", VARIANTS)
async def test_cached_answers_are_kept_apart_by_path_and_query(
    gateway: Callable[..., Any], upstream: Callable[..., Any],
    session: aiohttp.ClientSession, differs: str,
) -> None:
    up = await upstream("up", delay=0)
    base = (await gateway([up], **CACHE_ONLY)).url
    paths = VARIANTS[differs]
    firsts = [await post(session, base + path) for path in paths]
    again = [await post(session, base + path) for path in paths]
    assert [answer(r)[1] for r in firsts] == paths
    assert [r[1]["X-Cache"] for r in firsts] == ["MISS"] * len(paths)
    assert [answer(r) for r in again] == [answer(r) for r in firsts]
    assert [r[1]["X-Cache"] for r in again] == ["HIT"] * len(paths)
    assert asked(up[1]) == paths
