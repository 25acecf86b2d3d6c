"""The circuit breaker per provider (issue #4): consecutive failures open it, an open
breaker answers 503 ``circuit_open`` at once without an upstream call, one probe goes
through after the cooldown, and ``/health`` shows the state. Real upstreams on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.breaker import BreakerSettings, CircuitBreaker, CircuitOpen
from tests.conftest import MakeConfig, StartGateway, StartUpstream

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


class Flaky:
    """Answers ``status`` until told otherwise; counts calls."""

    def __init__(self, status: int):
        self.status = status
        self.calls = 0

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.Response:
            await request.read()
            self.calls += 1
            if self.status != 200:
                return web.json_response({"error": {"message": "down", "type": "x"}},
                                         status=self.status)
            return web.json_response({"id": "ok", "object": "chat.completion",
                                      "created": 0, "model": "m", "choices": []})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


async def post(session: aiohttp.ClientSession, base: str) -> tuple[int, dict[str, str], Any]:
    async with session.post(f"{base}/v1/chat/completions",
                            json={"model": "m", "messages": MESSAGES}) as response:
        return response.status, dict(response.headers), await response.json()


async def health(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/health") as response:
        breaker: dict[str, Any] = (await response.json())["providers"][0]["breaker"]
        return breaker


async def test_failures_open_the_breaker_then_a_probe_closes_it(
    start_upstream: StartUpstream, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    upstream = Flaky(500)
    url = await start_upstream(upstream.app())
    base = await start_gateway(make_config(
        [{"name": "up", "type": "openai_compat", "base_url": f"{url}/v1", "models": ["m"]}],
        breaker={"failures": 3, "cooldown": 0.3}, health_cache_ttl=0))
    async with aiohttp.ClientSession() as session:
        statuses = [(await post(session, base))[0] for _ in range(3)]
        assert statuses == [500] * 3  # the upstream's own answers, relayed
        status, headers, body = await post(session, base)
        assert (status, body["error"]["code"]) == (503, "circuit_open")
        assert int(headers["Retry-After"]) >= 1
        assert upstream.calls == 3, "an open breaker must not call the upstream"
        assert (await health(session, base))["state"] == "open"

        await asyncio.sleep(0.35)  # cooldown over: one probe, which fails
        assert (await post(session, base))[0] == 500
        assert (await post(session, base))[0] == 503
        assert upstream.calls == 4

        upstream.status = 200
        await asyncio.sleep(0.35)
        assert (await post(session, base))[0] == 200  # the probe succeeds: closed
        assert [(await post(session, base))[0] for _ in range(3)] == [200] * 3
        state = await health(session, base)
    assert state == {"state": "closed", "consecutive_failures": 0, "opened_total": 2}


@pytest.mark.parametrize(("status", "opens"), [(429, False), (400, False), (503, True)])
async def test_only_upstream_faults_count(
    status: int, opens: bool, start_upstream: StartUpstream, start_gateway: StartGateway,
    make_config: MakeConfig,
) -> None:
    upstream = Flaky(status)
    url = await start_upstream(upstream.app())
    base = await start_gateway(make_config(
        [{"name": "up", "type": "openai_compat", "base_url": f"{url}/v1", "models": ["m"]}],
        breaker={"failures": 2, "cooldown": 5}))
    async with aiohttp.ClientSession() as session:
        last = [(await post(session, base))[0] for _ in range(3)][-1]
    assert (last == 503 and upstream.calls == 2) is opens


def test_the_half_open_probe_is_alone() -> None:
    now = [0.0]
    breaker = CircuitBreaker("p", BreakerSettings(failures=1, cooldown=1),
                             clock=lambda: now[0])
    assert breaker.check() is False
    breaker.record(failed=True)
    with pytest.raises(CircuitOpen):
        breaker.check()
    now[0] = 1.0
    assert breaker.state == "half_open"
    assert breaker.check() is True  # the probe
    with pytest.raises(CircuitOpen):
        breaker.check()  # no second request while it runs
    breaker.record(failed=None, probe=True)  # its client left: the next may probe
    assert breaker.check() is True
    breaker.record(failed=False, probe=True)
    assert breaker.state == "closed"
    assert not BreakerSettings(failures=0).failures  # 0 turns the breaker off


def test_a_breaker_with_failures_zero_never_opens() -> None:
    breaker = CircuitBreaker("p", BreakerSettings(failures=0))
    for _ in range(100):
        breaker.check()
        breaker.record(failed=True)
    assert breaker.state == "closed"


def cut_stream_app(calls: list[int]) -> web.Application:
    """A 200 event stream that sends one event, then resets the connection."""
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        calls.append(1)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 0}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.mark.parametrize("shared", [False, True], ids=["direct", "deduplicated"])
async def test_streams_the_upstream_cuts_count_as_failures(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    shared: bool,
) -> None:
    calls: list[int] = []
    url = await start_upstream(cut_stream_app(calls))
    base = await start_gateway(make_config(
        [{"name": "up", "type": "openai_compat", "base_url": f"{url}/v1", "models": ["m"]}],
        breaker={"failures": 2, "cooldown": 60}, cache={"enabled": False}))
    body = {"model": "m", "messages": MESSAGES, "stream": True,
            "temperature": 0 if shared else 1}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(f"{base}/v1/chat/completions", json=body) as response:
                assert response.status == 200
                assert b"event: error" in await response.read()
        async with session.post(f"{base}/v1/chat/completions", json=body) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "circuit_open"
        assert (await health(session, base))["state"] == "open"
    assert len(calls) == 2


def test_only_the_probe_decides_a_half_open_circuit() -> None:
    """A call begun before the circuit opened (a long stream, say) that ends later says
    nothing of the upstream now: it neither closes the circuit nor ends the probe."""
    now = [0.0]
    breaker = CircuitBreaker("up", BreakerSettings(failures=1, cooldown=10),
                             clock=lambda: now[0])
    breaker.record(failed=True)
    breaker.record(failed=False)  # a straggler that began while it was closed
    assert breaker.state == "open"
    now[0] = 11.0
    assert breaker.check() is True  # the probe
    breaker.record(failed=False)  # another straggler, mid-probe
    with pytest.raises(CircuitOpen):
        breaker.check()  # still one probe at a time
    breaker.record(failed=False, probe=True)
    assert breaker.state == "closed"


async def test_a_failure_that_opens_the_circuit_is_relayed_not_retried_into_it(
    start_upstream: StartUpstream, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    upstream = Flaky(500)
    url = await start_upstream(upstream.app())
    base = await start_gateway(make_config(
        [{"name": "up", "type": "openai_compat", "base_url": f"{url}/v1", "models": ["m"]}],
        breaker={"failures": 1, "cooldown": 60},
        retries={"max_attempts": 3, "base_delay": 0.01, "max_delay": 0.02}))
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(session, base)
    assert (status, upstream.calls) == (500, 1)  # the upstream's answer, not circuit_open
    assert body["error"]["message"] == "down"
