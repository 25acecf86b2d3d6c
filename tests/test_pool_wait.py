"""A request waiting for a pooled connection waits at most its connect deadline (nothing
hangs): with every connection of ``pool.limit`` busy, the wait for one and the opening of
a new one together stay within ``timeouts.connect``, then ``504 connect_timeout``. A
waiter that leaves, at its deadline or cancelled, leaves the queue and passes on a
connection or a slot handed to it at that same moment."""

from __future__ import annotations

import asyncio
import functools
import time

import pytest
from aiohttp import web
from yarl import URL

from proxy.app import build_app
from proxy.server.serve import running
from proxy.state import LIVE
from proxy.upstream.pool import ConnectionPool, WaitTimeout
from proxy.upstream.protocol import UpstreamProtocol
from tests.conftest import MakeConfig, StartFake
from tests.fake_upstream import CHAT as CHAT_PATH
from tests.fake_upstream import Reply, Seen, replaced
from tests.polling import until
from tests.wire import CHAT, StartRaw, answer_each, error_code, fetch

CONNECT = 0.3


async def test_a_full_pool_answers_connect_timeout_then_serves_again(
        start_fake: StartFake, make_config: MakeConfig) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    upstream = await start_fake()
    held = replaced(upstream.chat, gate=release)

    async def hook(request: web.Request, seen: Seen) -> Reply | None:
        if seen.path != CHAT_PATH or seen.call != 1:
            return None
        entered.set()  # the first request holds the pool's only connection
        return held

    upstream.hook = hook
    provider = upstream.provider("prov")
    config = make_config([provider], server={"port": 0}, pool={"limit": 1},
                         timeouts={"connect": CONNECT}, dedup={"mode": "off"},
                         cache={"enabled": False})
    gateway_app = build_app(config)
    client = gateway_app[LIVE].shared.client
    async with running(config, app=gateway_app) as base:
        url = f"{base}/v1/chat/completions"
        first = asyncio.create_task(fetch(url, body=CHAT))
        await asyncio.wait_for(entered.wait(), 5)
        started = time.perf_counter()
        status, _, body = await asyncio.wait_for(fetch(url, body=CHAT), 5)
        waited = time.perf_counter() - started
        assert (status, error_code(body)) == (504, "connect_timeout")
        assert CONNECT * 0.9 <= waited < 3, f"answered after {waited:.2f} s"
        message = body.decode()
        assert "pool.limit" in message and "timeouts.connect" in message
        assert base not in message and str(URL(provider["base_url"]).port) not in message
        assert "open=1 idle=0 waiting=0" in repr(client), "the waiter stayed queued"
        # A full pool is this worker's state, not the upstream's: no breaker failure.
        dispatcher = gateway_app[LIVE].gateway.dispatcher
        assert dispatcher.breaker("prov")["window"]["failures"] == 0
        release.set()
        assert (await asyncio.wait_for(first, 5))[0] == 200
        status, _, _ = await asyncio.wait_for(fetch(url, body=CHAT), 5)
        assert status == 200
        assert "in_flight=0" in repr(client)
        assert "open=1 idle=1 waiting=0 limit=1" in repr(client)
    assert upstream.chats == 2, "the timed-out request must never reach the upstream"


@pytest.mark.parametrize("handed", ["connection", "slot"])
async def test_what_reaches_a_waiter_at_its_deadline_is_passed_on(
        raw_upstream: StartRaw, handed: str) -> None:
    """The race: a connection given back (or a slot freed) for the first waiter exactly
    as its deadline fires. The loop is blocked past that deadline, then the hand-over is
    scheduled: asyncio runs the callbacks ready at the start of an iteration before the
    timers that fell due, so the hand-over lands just before the deadline's timer, and
    the waiter's task learns of both at once. What it was handed must reach the second."""
    upstream = await raw_upstream(answer_each)
    pool = ConnectionPool(limit=1, keepalive=30, connect_timeout=5)
    pool.start()
    try:
        origin = pool.origin(URL(upstream.url), None)
        held = await pool.acquire(origin)
        first = asyncio.create_task(pool.acquire(origin, CONNECT))
        second = asyncio.create_task(pool.acquire(origin, 5))
        await until(lambda: "waiting=2" in repr(pool))
        loop = asyncio.get_running_loop()
        handed_over: list[str] = []

        def past_the_deadline() -> None:
            time.sleep(CONNECT * 1.5)  # the first waiter's timer is due, not yet run
            if handed == "connection":
                loop.call_soon(functools.partial(pool.release, held, reuse=True))
            else:
                held.abort()  # the transport reports the close in the next iteration
            loop.call_soon(lambda: handed_over.append(repr(pool)))

        loop.call_soon(past_the_deadline)
        with pytest.raises(WaitTimeout):
            await asyncio.wait_for(first, 2)
        freed = "open=1 idle=0" if handed == "connection" else "open=0 idle=0"
        assert f"{freed} waiting=1" in handed_over[0], "not handed before the deadline"
        got: UpstreamProtocol = await asyncio.wait_for(second, 2)
        assert (got is held) == (handed == "connection")
        assert got.reusable
        assert "open=1 idle=0 waiting=0" in repr(pool)
        pool.release(got, reuse=True)
        assert "open=1 idle=1 waiting=0" in repr(pool)
    finally:
        await pool.close()
