"""The upstream deadline timer is one per connection (issue 11: a timer made and
cancelled per exchange showed in the profile): an exchange ends leaving it armed, and the
next exchange on the connection re-arms it only when its own deadline falls sooner.

What must hold: an exchange on a reused connection is held to *its* deadline, also
when the exchange before it (another provider on the same origin) had a longer one, and
a connection left idle with its timer armed is neither closed nor failed by it."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
from aiohttp import web

from tests.conftest import StartLive
from tests.fake_upstream import FakeUpstream, Reply, Seen

LIMIT = 0.3
SLACK = 1.5  # how late a deadline may fire on a busy 2-core machine


def _chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


async def test_a_reused_connection_holds_each_exchange_to_its_own_deadline(
    fake_upstream: FakeUpstream, live_gateway: StartLive,
) -> None:
    hold = asyncio.Event()

    async def hook(request: web.Request, seen: Seen) -> Reply | None:
        return Reply(gate=hold) if seen.json()["model"] == "m-short" else None

    fake_upstream.hook = hook
    gateway = await live_gateway(
        fake_upstream.provider("long", models=["m-long"], timeouts={"headers": 30}),
        fake_upstream.provider("short", models=["m-short"], timeouts={"headers": LIMIT}),
        cache={"enabled": False}, dedup={"mode": "off"})
    url = f"{gateway.url}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):  # the long deadline's timer is armed and left on the connection
                async with session.post(url, json=_chat("m-long")) as answer:
                    assert answer.status == 200, await answer.text()
            started = time.perf_counter()
            async with session.post(url, json=_chat("m-short")) as answer:
                body = orjson.loads(await answer.read())
            elapsed = time.perf_counter() - started
            assert (answer.status, body["error"]["code"]) == (504, "upstream_headers_timeout")
            assert LIMIT * 0.8 < elapsed < LIMIT + SLACK
            # The connection its timer was left on, idle past the short deadline, still
            # serves: the timer found no exchange to fail.
            await asyncio.sleep(LIMIT * 2)
            async with session.post(url, json=_chat("m-long")) as answer:
                assert answer.status == 200, await answer.text()
    finally:
        hold.set()
    assert fake_upstream.chats == 5
