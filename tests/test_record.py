"""The request record (``proxy/record.py``): what the observers (access log, metrics,
usage) are told of each request once it has ended. A real gateway app with an observer
added, a real upstream on loopback, the official SDK or aiohttp as the client."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from proxy.config.keys import hash_secret
from tests.conftest import MakeConfig, StartUpstream
from tests.observing import ANSWER, CHAT, answering, observed, provider, until


async def test_a_chat_request_is_recorded_with_its_route_and_origin(
    start_upstream: StartUpstream, make_config: MakeConfig,
) -> None:
    url = await start_upstream(answering(ANSWER))
    async with observed(make_config([provider("up", url)], cache={"enabled": False})) \
            as (gateway, seen), aiohttp.ClientSession() as session:
        async with session.post(f"{gateway}/v1/chat/completions", json=CHAT) as response:
            assert response.status == 200
            await response.read()
        async with session.get(f"{gateway}/v1/nowhere/at/all") as response:
            assert response.status == 404
        await until(seen, 2)
    chat_record, missing = seen
    assert (chat_record.path, chat_record.method, chat_record.status) == (
        "/v1/chat/completions", "POST", 200)
    assert chat_record.model == "m" and chat_record.provider == "up"
    assert chat_record.origin is not None and chat_record.origin.attempts == 1
    assert chat_record.upstream_status == 200 and chat_record.ended == "completed"
    assert chat_record.bytes_in > 0 and chat_record.bytes_out > 0
    first = chat_record.time_to_first_byte()
    assert first is not None and 0 < first <= chat_record.duration()
    assert missing.path == "/v1/other" and missing.status == 404


async def test_a_refused_request_and_a_failover_are_recorded(
    start_upstream: StartUpstream, make_config: MakeConfig, closed_port: int,
) -> None:
    url = await start_upstream(answering(ANSWER))
    dead = provider("dead", f"http://127.0.0.1:{closed_port}")
    config = make_config([dead, provider("alive", url)], cache={"enabled": False},
                         dedup={"mode": "off"}, deployments={"m": ["dead", "alive"]},
                         auth={"keys": [{"name": "team-a",
                                         "sha256": hash_secret("sk-gw-secret-1")}]})
    async with observed(config) as (gateway, seen), aiohttp.ClientSession() as session:
        async with session.post(f"{gateway}/v1/chat/completions", json=CHAT) as response:
            assert response.status == 401
        for _ in range(2):  # the balancer takes turns: one of the two meets "dead" first
            async with session.post(f"{gateway}/v1/chat/completions", json=CHAT, headers={
                    "Authorization": "Bearer sk-gw-secret-1"}) as response:
                assert response.status == 200, await response.text()
        await until(seen, 3)
    refused, *served = seen
    assert refused.status == 401 and refused.error_code == "invalid_api_key"
    assert refused.key_name is None
    assert refused.path == "/v1/chat/completions"  # named though the handler never ran
    assert {r.key_name for r in served} == {"team-a"}
    assert {r.provider for r in served} == {"alive"}
    failed_over = [r for r in served if r.origin is not None and r.origin.taken]
    assert len(failed_over) == 1, served
    assert failed_over[0].origin is not None
    assert (failed_over[0].origin.taken, failed_over[0].origin.attempts) == ("failover", 2)


@pytest.mark.parametrize("cut", ["upstream", "client"])
async def test_how_a_stream_ended_is_recorded(
    start_upstream: StartUpstream, make_config: MakeConfig, cut: str,
) -> None:
    async def chat(request: web.Request) -> web.StreamResponse:
        """One event, then a reset or a stall (wire behaviour: not FakeUpstream's)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"n": 1}\n\n')
        if cut == "upstream":
            assert request.transport is not None
            request.transport.abort()
            return response
        await asyncio.sleep(5)
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    url = await start_upstream(app)
    config = make_config([provider("up", url)], cache={"enabled": False})
    async with observed(config) as (gateway, seen), aiohttp.ClientSession() as session:
        async with session.post(f"{gateway}/v1/chat/completions",
                                json={**CHAT, "stream": True}) as response:
            assert response.status == 200
            await response.content.readuntil(b"\n\n")
            if cut == "upstream":
                await response.read()
        await until(seen, 1)
    (record,) = seen
    assert record.stream
    if cut == "upstream":
        assert (record.ended, record.status) == ("upstream_error", 200)
    else:
        assert (record.ended, record.status) == ("client_disconnect", 499)
    assert record.bytes_out > 0  # what reached the client before the cut, head and event


async def test_failed_tries_and_their_backoff_are_upstream_time_not_overhead(
    make_config: MakeConfig, closed_port: int,
) -> None:
    """The status page showed 87-219 ms of "overhead" on requests to a refusing
    upstream: failed tries and their backoff were not counted as the upstream's time."""
    config = make_config([provider("down", f"http://127.0.0.1:{closed_port}")],
                         cache={"enabled": False},
                         retries={"max_attempts": 3, "base_delay": 0.2, "max_delay": 0.2,
                                  "budget": 1.0})
    async with observed(config) as (gateway, seen), aiohttp.ClientSession() as session:
        for _ in range(3):  # full-jitter backoff: each request waits 0-400 ms
            async with session.post(f"{gateway}/v1/chat/completions", json=CHAT) as response:
                assert response.status == 502
        await until(seen, 3)
    waited = sum(r.upstream_wait for r in seen)
    assert waited > 0.1, waited
    assert seen[0].origin is not None and seen[0].origin.attempts == 3
    for record in seen:
        assert record.overhead_ms() - (time.perf_counter() - record.finished) * 1000 < 50
