"""Bursts of long requests against an upstream that never pushes back: with the default
configuration the gateway must serve them all, as a plain proxy would.

Issue 9: "300 concurrent chat requests of 1 s each against an upstream with no limit:
only 116 succeed, the rest get 503 gateway_overloaded"; "Defaults that a burst of 1,000
concurrent long requests against an upstream that does not push back passes with zero
503s". The gateway is a real ``python -m proxy serve`` process with no ``limits`` block
(``tests/procs.py``); the upstream is the counting fake upstream
(``tests/fake_upstream.py``) in this process on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from tests.conftest import StartFake
from tests.fake_upstream import CHAT, FakeUpstream, Reply, Seen, replaced
from tests.procs import gateway_process, nofile_raised


def long_upstream(fake: FakeUpstream, delay: float, expected: int = 0,
                  hold: float = 8.0) -> FakeUpstream:
    """Makes ``fake`` answer after ``delay`` s, a stream as one event ``delay`` s after its
    head; never 429/503 (``fake.most_inflight`` is the most requests in flight at once).

    With ``expected``, every request first waits (up to ``hold`` s) until that many are
    in flight together, so the count does not depend on how fast a loaded machine opens
    the client's connections: a gateway that passes everything on at once shows exactly
    ``expected``; one that holds requests back shows its limit."""
    fake.chat.latency = delay
    stream = replaced(fake.chat, latency=0.0, pieces=("long",), interval=delay)
    everyone = asyncio.Event()

    async def together(request: web.Request, seen: Seen) -> Reply | None:
        if seen.path != CHAT:  # the gateway's own probes answer at once
            return None
        if fake.inflight >= expected:
            everyone.set()
        if expected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(everyone.wait(), hold)
        return stream if (seen.json() or {}).get("stream") else None

    fake.hook = together
    return fake


async def burst(url: str, count: int, stream_every: int, within: float) -> Counter[str]:
    """``count`` concurrent sampled requests (never shared), every ``stream_every``-th a
    stream; the outcome of each, all bounded by ``within`` seconds."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=within)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one(i: int) -> str:
            body: dict[str, Any] = {"model": "m", "temperature": 0.7, "user": str(i),
                                    "messages": [{"role": "user", "content": "hi"}]}
            if stream_every and i % stream_every == 0:
                body["stream"] = True
            try:
                async with session.post(url, data=orjson.dumps(body), headers={
                        "Content-Type": "application/json"}) as response:
                    data = await response.read()
                    if response.status == 200 and body.get("stream"):
                        assert data.endswith(b"data: [DONE]\n\n"), data
                    return str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return type(exc).__name__

        return Counter(await asyncio.gather(*(one(i) for i in range(count))))


async def run_burst(start_fake: StartFake, tmp_path: Path, *, count: int,
                    delay: float, stream_every: int) -> tuple[Counter[str], float, int]:
    upstream = long_upstream(await start_fake(), delay, expected=count)
    config = {"providers": [upstream.provider()]}
    with nofile_raised(4 * count + 256):
        async with gateway_process(tmp_path, config, log_level="WARNING") as gateway:
            started = time.monotonic()
            outcomes = await burst(gateway.url + CHAT, count, stream_every, within=25)
            took = time.monotonic() - started
    return outcomes, took, upstream.most_inflight


async def test_300_concurrent_one_second_requests_all_succeed(
    start_fake: StartFake, tmp_path: Path,
) -> None:
    outcomes, took, most = await run_burst(start_fake, tmp_path, count=300, delay=1.0,
                                           stream_every=0)
    assert outcomes == Counter({"200": 300}), outcomes
    assert most == 300, most  # passed on together, none held back (a limit of 32 shows 32)
    assert took < 15, took


async def test_1000_concurrent_long_requests_streams_too_get_no_503(
    start_fake: StartFake, tmp_path: Path,
) -> None:
    outcomes, took, most = await run_burst(start_fake, tmp_path, count=1000,
                                           delay=2.5, stream_every=2)
    assert outcomes == Counter({"200": 1000}), outcomes
    assert most == 1000, most
    assert took < 25, took


async def test_one_old_503_does_not_shed_a_later_burst(
    start_fake: StartFake, tmp_path: Path,
) -> None:
    """A single 503 at low concurrency cuts the limit to ``min`` (4); once
    ``limits.forget_after`` has passed with no overload since, a burst is admitted at
    once instead of being held to 4 and shed after the queue timeout."""
    upstream = long_upstream(await start_fake(), 1.0, expected=100)
    long = upstream.hook
    assert long is not None

    async def once_overloaded(request: web.Request, seen: Seen
                              ) -> Reply | web.StreamResponse | None:
        """Its first request: 503 at once (one request's bad luck), the only overload
        evidence the gateway ever gets; then as ``long_upstream``."""
        if seen.call == 1:
            return replaced(upstream.chat, status=503, latency=0.0)
        return await long(request, seen)

    upstream.hook = once_overloaded
    config = {"providers": [upstream.provider()],
              "retries": {"max_attempts": 1}, "limits": {"forget_after": 1}}
    with nofile_raised(4 * 100 + 256):
        async with gateway_process(tmp_path, config, log_level="WARNING") as gateway:
            assert await burst(gateway.url + CHAT, 1, 0, within=10) == Counter({"503": 1})
            async with aiohttp.ClientSession() as session, \
                    session.get(gateway.url + "/health") as response:
                limiter = (await response.json())["providers"][0]["concurrency"]
            assert limiter["limit"] == 4, limiter
            await asyncio.sleep(1.2)
            outcomes = await burst(gateway.url + CHAT, 100, 4, within=20)
    assert outcomes == Counter({"200": 100}), outcomes
    assert upstream.most_inflight == 100, upstream.most_inflight
