"""Bursts of long requests against an upstream that never pushes back: with the default
configuration the gateway must serve them all, as a plain proxy would.

Issue 9: "300 concurrent chat requests of 1 s each against an upstream with no limit:
only 116 succeed, the rest get 503 gateway_overloaded"; "Defaults that a burst of 1,000
concurrent long requests against an upstream that does not push back passes with zero
503s". The gateway is a real ``python -m proxy serve`` process with no ``limits`` block
(``tests/procs.py``); the upstream is an aiohttp app in this process on loopback.
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

from tests.conftest import StartUpstream
from tests.procs import gateway_process, nofile_raised

CHAT = "/v1/chat/completions"


class LongUpstream:
    """Answers after ``delay`` s, a stream as two events ``delay`` s after its headers;
    never 429/503. Counts the most requests in flight at once.

    With ``expected``, every request first waits (up to ``hold`` s) until that many are
    in flight together, so the count does not depend on how fast a loaded machine opens
    the client's connections: a gateway that passes everything on at once shows exactly
    ``expected``; one that holds requests back shows its limit."""

    def __init__(self, delay: float, expected: int = 0, hold: float = 8.0):
        self.delay = delay
        self.expected, self.hold = expected, hold
        self.everyone = asyncio.Event()
        self.in_flight = self.most = 0

    def app(self) -> web.Application:
        app = web.Application(handler_args={"max_field_size": 8190})
        app.router.add_post(CHAT, self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        if self.in_flight >= self.expected:
            self.everyone.set()
        try:
            if self.expected:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.everyone.wait(), self.hold)
            if not payload.get("stream"):
                await asyncio.sleep(self.delay)
                return web.json_response({"id": "long", "object": "chat.completion"})
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await asyncio.sleep(self.delay)
            await response.write(b'data: {"n": 1}\n\ndata: [DONE]\n\n')
            await response.write_eof()
            return response
        finally:
            self.in_flight -= 1


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


async def run_burst(start_upstream: StartUpstream, tmp_path: Path, *, count: int,
                    delay: float, stream_every: int) -> tuple[Counter[str], float, int]:
    upstream = LongUpstream(delay, expected=count)
    url = await start_upstream(upstream.app())
    config = {"providers": [{"name": "up", "type": "openai_compat",
                             "base_url": f"{url}/v1", "models": ["m"]}]}
    with nofile_raised(4 * count + 256):
        async with gateway_process(tmp_path, config, log_level="WARNING") as gateway:
            started = time.monotonic()
            outcomes = await burst(gateway.url + CHAT, count, stream_every, within=25)
            took = time.monotonic() - started
    return outcomes, took, upstream.most


async def test_300_concurrent_one_second_requests_all_succeed(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    outcomes, took, most = await run_burst(start_upstream, tmp_path, count=300, delay=1.0,
                                           stream_every=0)
    assert outcomes == Counter({"200": 300}), outcomes
    assert most == 300, most  # passed on together, none held back (a limit of 32 shows 32)
    assert took < 15, took


async def test_1000_concurrent_long_requests_streams_too_get_no_503(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    outcomes, took, most = await run_burst(start_upstream, tmp_path, count=1000,
                                           delay=2.5, stream_every=2)
    assert outcomes == Counter({"200": 1000}), outcomes
    assert most == 1000, most
    assert took < 25, took


class OnceOverloadedUpstream(LongUpstream):
    """Answers its first request 503 at once (one request's bad luck), then like
    ``LongUpstream``: the only overload evidence the gateway ever gets."""

    def __init__(self, delay: float):
        super().__init__(delay, expected=100)
        self.refused = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if not self.refused:
            self.refused += 1
            return web.json_response({"error": {"message": "busy", "type": "server_error",
                                                "code": None, "param": None}}, status=503)
        return await super().chat(request)


async def test_one_old_503_does_not_shed_a_later_burst(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    """A single 503 at low concurrency cuts the limit to ``min`` (4); once
    ``limits.forget_after`` has passed with no overload since, a burst is admitted at
    once instead of being held to 4 and shed after the queue timeout."""
    upstream = OnceOverloadedUpstream(1.0)
    url = await start_upstream(upstream.app())
    config = {"providers": [{"name": "up", "type": "openai_compat",
                             "base_url": f"{url}/v1", "models": ["m"]}],
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
    assert upstream.most == 100, upstream.most
