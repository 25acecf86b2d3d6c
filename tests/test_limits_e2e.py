"""Adaptive limits end to end: what an upstream shows moves its provider's limit, and the
shared pool keeps no more connections to it than that limit.

Issue #3: "Per provider, a concurrency limit adjusted at run time from what the upstream
shows (latency rising, 429/503 answers, connection errors) [...] between configured
bounds. The shared ``TCPConnector``'s per-host limit follows it." The controller alone is
unit-tested in ``test_limits.py``; here the real gateway feeds it (``resilience/attempt.py``)
and ``app.py`` wires it to the pool (``UpstreamClient.limit_follower``). Limits are read
back from ``GET /health``; connections are counted at a raw upstream (``tests/wire.py``).
A cut happens at most once per round trip (only requests admitted after the last cut
count), so requests meant to cut twice are sent one after the other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import MakeConfig, StartFake, StartGateway
from tests.fake_upstream import FakeUpstream, Reply, Seen, replaced
from tests.polling import until
from tests.wire import ANSWER, Conn, StartRaw, error_code, post_json

CHAT = "/v1/chat/completions"
# Eight slots that may only shrink (max = initial), halved by each 429/503/refusal.
LIMITS = {"initial": 8, "min": 1, "max": 8, "backoff": 0.5}
SPACING = 0.15  # more than the limiter's 0.1 s update interval: one cut per request


def provider(name: str, base_url: str, model: str = "m") -> dict[str, Any]:
    return {"name": name, "type": "openai_compat", "base_url": base_url, "models": [model]}


def chat(model: str = "m", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


async def concurrency(session: aiohttp.ClientSession, base: str, name: str
                      ) -> dict[str, Any]:
    """``providers[i].concurrency`` of ``GET /health`` for the provider ``name``."""
    async with session.get(base + "/health") as response:
        body = await response.json()
    state: dict[str, Any] = next(p["concurrency"] for p in body["providers"]
                                 if p["name"] == name)
    return state


@pytest.mark.parametrize(("status", "temperature", "limits"), [
    (429, 0.7, [1, 1]), (503, 0.7, [1, 1]), (429, 0, [1, 1]),
    (500, 0.7, [8, 8]), (200, 0.7, [8, 8])],
    ids=["429", "503", "429-shared", "500-keeps", "200-keeps"])
async def test_overload_answers_lower_the_providers_limit(
    start_fake: StartFake, cacheless_gateway: Callable[..., Any],
    session: aiohttp.ClientSession, status: int, temperature: float, limits: list[int],
) -> None:
    """429 and 503 cut the limit to ``backoff`` (0.5) x the one request in flight, so to
    ``min``, on the direct path (sampled) and on the shared one (``temperature`` 0);
    another error answer says nothing about capacity."""
    upstream = await start_fake(status=status)
    base = await cacheless_gateway([upstream.provider()], limits=LIMITS)
    assert (await concurrency(session, base, "up"))["limit"] == 8
    seen = []
    for i in range(2):
        await asyncio.sleep(SPACING)
        body = chat(temperature=temperature, user=str(i))
        got, _, _ = await post_json(session, base + CHAT, body)
        assert got == status  # relayed as the upstream answered
        seen.append((await concurrency(session, base, "up"))["limit"])
    assert seen == limits
    assert upstream.chats == 2


async def test_refused_connections_lower_only_that_providers_limit(
    start_fake: StartFake, cacheless_gateway: Callable[..., Any],
    session: aiohttp.ClientSession, closed_port: int,
) -> None:
    good = await start_fake(models=("g",))
    base = await cacheless_gateway([good.provider("good"),
                                    provider("down", f"http://127.0.0.1:{closed_port}/v1", "d")],
                                   limits=LIMITS)
    seen = []
    for i in range(2):
        await asyncio.sleep(SPACING)
        got, _, body = await post_json(session, base + CHAT, chat("d", temperature=0.7))
        assert (got, error_code(body)) == (502, "upstream_unreachable")
        assert (await post_json(session, base + CHAT, chat("g", user=str(i))))[0] == 200
        seen.append((await concurrency(session, base, "down"))["limit"])
    assert seen == [1, 1]
    assert (await concurrency(session, base, "down"))["cuts"] == 2
    assert (await concurrency(session, base, "good"))["limit"] == 8
    assert good.chats == 2


async def rounds(session: aiohttp.ClientSession, url: str, count: int = 1,
                 until: float = 0.0, width: int = 5) -> None:
    """``count`` rounds (or rounds until ``until`` on the monotonic clock) of ``width``
    concurrent sampled requests, each of which must succeed."""
    done = 0
    while done < count or time.monotonic() < until:
        replies = await asyncio.gather(*(post_json(session, url, chat(temperature=0.7))
                                         for _ in range(width)))
        assert [r[0] for r in replies] == [200] * width
        done += 1


async def test_short_answers_then_long_ones_keep_the_limit(
    start_fake: StartFake, cacheless_gateway: Callable[..., Any],
    session: aiohttp.ClientSession,
) -> None:
    """Issue 9: a burst of long generations after short ones is not congestion."""
    upstream = await start_fake(latency=0.02)
    base = await cacheless_gateway([upstream.provider()], limits=LIMITS)
    url = base + CHAT
    await rounds(session, url, until=time.monotonic() + 0.45, width=8)
    upstream.chat.latency = 1.0  # fifty times the short answers
    await rounds(session, url, count=2, width=8)
    state = await concurrency(session, base, "up")
    assert (state["limit"], state["shed_total"]) == (8, 0), state
    assert state["cuts"] == 0, state


async def test_the_pool_keeps_no_more_connections_than_the_lowered_limit(
    raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig,
    session: aiohttp.ClientSession,
) -> None:
    """app.py wires each limiter's ``on_limit_change`` to the pool: when a 429 cuts the
    limit from 4 to 2 (``min``), idle connections over it are closed; the two left serve."""
    status = [b"200 OK"]
    live: set[int] = set()  # id() of each open inference connection
    most = [0]  # the most inference connections open at once after the cut

    async def script(conn: Conn) -> None:
        try:
            async for _ in conn:
                live.add(id(conn))
                most[0] = max(most[0], len(live))
                await asyncio.sleep(0.1)
                await conn.send(ANSWER, status=status[0])
        finally:
            live.discard(id(conn))

    upstream = await raw_upstream(script)
    base = await start_gateway(make_config(
        [provider("up", upstream.url)], cache={"enabled": False},
        limits={"initial": 4, "min": 2, "max": 4, "backoff": 0.5}))
    url = base + CHAT
    replies = await asyncio.gather(*(post_json(session, url, chat(temperature=0.7))
                                     for _ in range(4)))
    assert [r[0] for r in replies] == [200] * 4
    assert len(live) == 4, "four concurrent requests, four kept-alive connections"
    status[0] = b"429 Too Many Requests"
    await asyncio.sleep(SPACING)
    assert (await post_json(session, url, chat(temperature=0.7)))[0] == 429
    assert (await concurrency(session, base, "up"))["limit"] == 2
    await until(lambda: len(live) <= 2)
    status[0], most[0] = b"200 OK", 0
    replies = await asyncio.gather(*(post_json(session, url, chat(temperature=0.7))
                                     for _ in range(2)))
    assert [r[0] for r in replies] == [200] * 2
    assert most[0] == 2
    assert len(live) == 2


def push_back(fake: FakeUpstream, room: int) -> None:
    """``fake`` answers 429 at once to a request arriving with ``room`` in progress."""
    busy = replaced(fake.chat, status=429, latency=0.0)

    async def hook(request: web.Request, seen: Seen) -> Reply | None:
        return busy if fake.inflight > room else None  # ``inflight`` counts this one

    fake.hook = hook


async def test_an_upstream_pushing_back_gets_its_limit_and_the_excess_is_shed(
    start_fake: StartFake, cacheless_gateway: Callable[..., Any],
    session: aiohttp.ClientSession,
) -> None:
    """Issue 9: 429s lower the limit (from max, the default start) until the upstream
    stops pushing back; then the excess gets the gateway's fast 503 + Retry-After."""
    push_back(upstream := await start_fake(latency=0.5), room=4)
    base = await cacheless_gateway([upstream.provider()],
                                   limits={"queue_size": 0, "backoff": 0.5})
    url = base + CHAT
    assert (await concurrency(session, base, "up"))["limit"] == 1024
    for _ in range(4):  # 20 -> 10 -> 5 -> min 4: each burst cuts once
        replies = await asyncio.gather(*(post_json(session, url, chat(temperature=0.7))
                                         for _ in range(20)))
    assert (await concurrency(session, base, "up"))["limit"] == 4
    started = time.monotonic()
    replies = await asyncio.gather(*(post_json(session, url, chat(temperature=0.7))
                                     for _ in range(20)))
    assert time.monotonic() - started < 2.0
    assert sorted(r[0] for r in replies) == [200] * 4 + [503] * 16
    for status, headers, body in replies:
        if status == 503:
            assert error_code(body) == "gateway_overloaded"
            assert int(headers["Retry-After"]) >= 1


@pytest.mark.parametrize("deadline", ["total", "headers"])
async def test_a_long_answer_cut_by_the_total_deadline_does_not_cut_the_limit(
    start_fake: StartFake, cacheless_gateway: Callable[..., Awaitable[str]],
    session: aiohttp.ClientSession, deadline: str,
) -> None:
    """A non-stream answer's headers come only once it is generated, so ``total`` can
    expire before them, and so can ``headers``: that is this request's length, not
    overload (review of issue 9)."""
    upstream = await start_fake(latency=0.5)
    base = await cacheless_gateway([upstream.provider()],
                                   limits={"min": 1, "max": 8}, timeouts={deadline: 0.2})
    status, _, _ = await post_json(session, base + CHAT, chat(temperature=0.7))
    assert status == 504
    state = await concurrency(session, base, "up")
    assert (state["limit"], state["cuts"]) == (8, 0), state
