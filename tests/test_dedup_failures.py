"""Deduplicated requests whose shared upstream call fails before any answer arrived.

Issue #3: "Non-stream: the first request leads; later ones await its future and get the
same status, headers and body. An upstream error is delivered to every waiter."
``test_dedup.py`` covers error *answers* (a 500 or 429 the upstream sent); here the call
never gets a head: the upstream is unreachable, silent past ``timeouts.read``, or the
limiter sheds it. The leader is held back long enough that the followers join its
exchange before it fails (the live gateway's in-flight map shows they did), and every
one of them must get the gateway's own error, with the exact status and code, not a
hang or a generic 500.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import StartFake, StartLive
from tests.polling import until
from tests.running import RunningGateway
from tests.wire import (
    MODELS,
    Conn,
    Reply,
    StartRaw,
    error_code,
    post_json,
    read_request,
)

CHAT = "/v1/chat/completions"
SHARED = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def provider(name: str, base_url: str, model: str = "m") -> dict[str, Any]:
    return {"name": name, "type": "openai_compat", "base_url": base_url, "models": [model]}


Cacheless = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
def cacheless(live_gateway: StartLive) -> Cacheless:
    """``await cacheless(providers, **raw_config)``: the live gateway (its in-flight map
    in reach), cache off so that only deduplication shares."""
    async def start(providers: list[dict[str, Any]], **raw: Any) -> RunningGateway:
        return await live_gateway(*providers, cache={"enabled": False}, **raw)

    return start


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        yield client


async def leader_then_followers(session: aiohttp.ClientSession, gateway: RunningGateway,
                                started: Callable[[], bool] = lambda: True,
                                followers: int = 3) -> list[Reply]:
    """The leader's reply, then the followers': they are sent once the leader leads an
    exchange in the gateway and ``started()`` says its call is under way (and not yet
    failed), so they join it; that they all joined is checked."""
    url, inflight = gateway.url + CHAT, gateway.inflight
    led, followed = inflight.led, inflight.followed
    leader = asyncio.create_task(post_json(session, url, SHARED))
    try:
        await gateway.until(lambda: inflight.led > led and started(),
                            what="the leader's call under way")
        replies = await asyncio.gather(*(post_json(session, url, SHARED) for _ in range(followers)))
        assert inflight.followed == followed + followers, "a follower led its own call"
        return [await asyncio.wait_for(leader, 5), *replies]
    finally:
        leader.cancel()


def codes(replies: list[Reply]) -> list[tuple[int, str]]:
    return [(status, error_code(body)) for status, _, body in replies]


async def test_unreachable_upstream_reaches_leader_and_followers(
    start_fake: StartFake, cacheless: Cacheless,
    session: aiohttp.ClientSession, closed_port: int,
) -> None:
    """The only pool connection (``pool.limit`` 1) is busy with another provider's call,
    so the leader's call waits for it while the followers join; then it is refused."""
    busy = await start_fake(models=("b",), latency=0.4)
    gateway = await cacheless(
        [busy.provider("busy"),
         provider("down", f"http://127.0.0.1:{closed_port}/v1")], pool={"limit": 1})
    holder = asyncio.create_task(post_json(session, gateway.url + CHAT, {**SHARED, "model": "b"}))
    try:
        await until(lambda: busy.chats == 1)
        replies = await leader_then_followers(session, gateway)
        assert codes(replies) == [(502, "upstream_unreachable")] * 4
        assert (await asyncio.wait_for(holder, 5))[0] == 200
    finally:
        holder.cancel()
    assert busy.chats == 1


async def test_upstream_silent_past_the_read_timeout_reaches_every_waiter(
    raw_upstream: StartRaw, cacheless: Cacheless, session: aiohttp.ClientSession,
) -> None:
    calls: list[bytes] = []

    async def silent(conn: Conn) -> None:
        while (request := await read_request(conn.reader)) is not None:
            if request.target.endswith("/models"):
                await conn.send(MODELS, extra=b"Connection: close\r\n")
                return
            calls.append(request.body)
            await conn.reader.read()  # nothing until the gateway gives up and closes

    upstream = await raw_upstream(silent)
    gateway = await cacheless([provider("up", upstream.url)], timeouts={"read": 0.4})
    started = time.monotonic()
    replies = await leader_then_followers(session, gateway, lambda: bool(calls))
    assert codes(replies) == [(504, "upstream_headers_timeout")] * 4
    assert time.monotonic() - started < 2.0
    assert len(calls) == 1, "the followers must wait on the leader's call"


@pytest.mark.parametrize("limits", [
    {"queue_size": 0},
    {"queue_size": 1, "queue_timeout": 0.3},
], ids=["queue-full", "queue-deadline"])
async def test_a_shed_shared_call_reaches_every_waiter_with_retry_after(
    start_fake: StartFake, cacheless: Cacheless,
    session: aiohttp.ClientSession, limits: dict[str, Any],
) -> None:
    """One slot, held by a sampled request: the shared call is shed at once (no queue)
    or when its queue deadline passes (the followers have joined by then)."""
    upstream = await start_fake(latency=0.8)
    gateway = await cacheless([upstream.provider()],
                         limits={"initial": 1, "min": 1, "max": 1, **limits})
    sampled = {**SHARED, "temperature": 0.7}
    holder = asyncio.create_task(post_json(session, gateway.url + CHAT, sampled))
    try:
        await until(lambda: upstream.chats == 1)
        if limits["queue_size"]:
            replies = await leader_then_followers(session, gateway)
        else:
            replies = await asyncio.gather(*(post_json(session, gateway.url + CHAT, SHARED)
                                             for _ in range(4)))
        assert codes(replies) == [(503, "gateway_overloaded")] * 4
        retry_after = [headers.get("Retry-After") for _, headers, _ in replies]
        assert all(value is not None and int(value) >= 1 for value in retry_after), retry_after
        assert (await asyncio.wait_for(holder, 5))[0] == 200
    finally:
        holder.cancel()
    assert upstream.chats == 1, "a shed call never reaches the upstream"
