"""The circuit breaker per provider against real upstreams on loopback (issues #4, #9):
one tenant's 500s or 5xx never open it for the others, a provider that refuses
connections still gets its requests (a fast 502, no 503 of the gateway's own), and
``fail_fast`` keeps the old 503 ``circuit_open`` with a half-open probe. The rules
themselves, with an injected clock, are in test_breaker_rules.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.conftest import MakeConfig, StartFake, StartGateway
from tests.fake_upstream import FakeUpstream, Reply, Seen, replaced

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
# Settings that open on little evidence, so a test sees it open.
EAGER = {"min_requests": 2, "min_callers": 1}


def flaky(fake: FakeUpstream, status: int = 200, bad_status: int = 200) -> Reply:
    """``fake`` answers ``status`` (``fake.chat.status``, until told otherwise) and ``ok``;
    the requests whose ``user`` is "bad" get the returned reply, ``bad_status`` until
    the test changes it."""
    fake.chat.status, fake.chat.pieces = status, ("ok",)
    bad = replaced(fake.chat, status=bad_status)

    async def hook(request: web.Request, seen: Seen) -> Reply | None:
        return bad if (seen.json() or {}).get("user") == "bad" else None

    fake.hook = hook
    return bad


async def post(session: aiohttp.ClientSession, base: str, user: str = "good",
               caller: str = "a") -> tuple[int, dict[str, str], Any]:
    async with session.post(f"{base}/v1/chat/completions",
                            headers={"Authorization": f"Bearer sk-{caller}"},
                            json={"model": "m", "messages": MESSAGES, "user": user}
                            ) as response:
        return response.status, dict(response.headers), await response.json()


async def health(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    async with session.get(f"{base}/health") as response:
        breaker: dict[str, Any] = (await response.json())["providers"][0]["breaker"]
        return breaker


async def test_500s_never_open_it_for_the_normal_requests_after_them(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    flaky(upstream := await start_fake(), bad_status=500)
    base = await start_gateway(make_config([upstream.provider()],
                                           health_cache_ttl=0))
    async with aiohttp.ClientSession() as session:
        bad = [(await post(session, base, user="bad", caller=f"c{n % 3}"))[0]
               for n in range(20)]
        good = [(await post(session, base, caller=f"c{n % 3}"))[0] for n in range(10)]
        assert (await health(session, base))["state"] == "closed"
    assert (bad, good) == ([500] * 20, [200] * 10)
    sdk = openai_client(base, max_retries=2)  # each bad request is sent three times
    failed = await asyncio.gather(*(  # at once: the SDK's backoffs overlap
        sdk.chat.completions.create(model="m", messages=MESSAGES, user="bad")
        for _ in range(20)), return_exceptions=True)
    assert all(isinstance(e, openai.InternalServerError) for e in failed), failed
    for _ in range(10):
        answer = await sdk.chat.completions.create(model="m", messages=MESSAGES)
        assert answer.choices[0].message.content == "ok"
    assert upstream.chats == 30 + 60 + 10


async def test_one_callers_502s_and_503s_do_not_open_it_for_another(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    bad_reply = flaky(upstream := await start_fake(), bad_status=503)
    base = await start_gateway(make_config([upstream.provider()],
                                           health_cache_ttl=0))
    async with aiohttp.ClientSession() as session:
        bad = [(await post(session, base, user="bad", caller="tenant"))[0]
               for _ in range(15)]
        bad_reply.status = 502
        bad += [(await post(session, base, user="bad", caller="tenant"))[0]
                for _ in range(15)]
        good = [(await post(session, base, caller="other"))[0] for _ in range(10)]
        state = await health(session, base)
    assert (bad, good) == ([503] * 15 + [502] * 15, [200] * 10)
    assert state["state"] == "closed"
    assert state["window"]["failing_callers"] == 1  # only ever one caller failing
    assert upstream.chats == 40


async def test_a_provider_refusing_connections_gets_fast_502s_not_circuit_open(
    start_gateway: StartGateway, make_config: MakeConfig, closed_port: int,
) -> None:
    """Its breaker opens, but with no other deployment the requests are still sent: the
    client sees the upstream's failure, at once (an open circuit is not retried)."""
    base = await start_gateway(make_config(
        [{"name": "up", "type": "openai_compat", "base_url": f"http://127.0.0.1:{closed_port}/v1",
          "models": ["m"]}], health_cache_ttl=0,
        retries={"max_attempts": 3, "base_delay": 0.05, "max_delay": 0.1}))
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        answers = [await post(session, base, caller=f"c{n % 2}") for n in range(30)]
        state = await health(session, base)
    elapsed = time.perf_counter() - started
    assert {(s, b["error"]["code"]) for s, _, b in answers} == {
        (502, "upstream_unreachable")}
    assert (state["state"], state["opened_total"]) == ("open", 1)
    assert state["panic_total"] >= 20
    assert elapsed < 10, f"30 refused requests took {elapsed:.1f} s"


async def test_fail_fast_answers_503_circuit_open_then_a_probe_closes_it(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    flaky(upstream := await start_fake(), 503)
    base = await start_gateway(make_config(
        [upstream.provider()], health_cache_ttl=0,
        breaker={"min_requests": 3, "cooldown": 0.3, "fail_fast": True}))
    async with aiohttp.ClientSession() as session:
        statuses = [(await post(session, base, caller=f"c{n % 2}"))[0] for n in range(3)]
        assert statuses == [503] * 3  # the upstream's own answers, relayed
        status, headers, body = await post(session, base)
        assert (status, body["error"]["code"]) == (503, "circuit_open")
        assert int(headers["Retry-After"]) >= 1
        assert upstream.chats == 3, "an open breaker must not call the upstream"
        assert (await health(session, base))["state"] == "open"

        await asyncio.sleep(0.35)  # cooldown over: one probe, which fails
        assert (await post(session, base))[2]["error"]["message"] == "failure 4"
        assert (await post(session, base))[2]["error"]["code"] == "circuit_open"
        assert upstream.chats == 4

        upstream.chat.status = 200
        await asyncio.sleep(0.35)
        assert (await post(session, base))[0] == 200  # the probe succeeds: closed
        assert [(await post(session, base))[0] for _ in range(3)] == [200] * 3
        state = await health(session, base)
    assert (state["state"], state["opened_total"], state["window"]["calls"]) == (
        "closed", 2, 3)


@pytest.mark.parametrize(("status", "opens"), [
    (429, False), (400, False), (500, False), (502, True), (503, True), (504, True)])
async def test_only_upstream_faults_count(
    status: int, opens: bool, start_fake: StartFake, start_gateway: StartGateway,
    make_config: MakeConfig,
) -> None:
    flaky(upstream := await start_fake(), status)
    base = await start_gateway(make_config(
        [upstream.provider()], breaker={**EAGER, "cooldown": 5, "fail_fast": True}))
    async with aiohttp.ClientSession() as session:
        last = [(await post(session, base))[0] for _ in range(3)][-1]
    assert (last == 503 and upstream.chats == 2) is opens


def cutting(fake: FakeUpstream, *, json: bool = False) -> FakeUpstream:
    """``fake``'s hook writes a 200 answer that resets the connection after its first
    bytes: an event stream after one event, or (``json``) a JSON body announced at 1,000
    bytes after 10."""
    async def cut(request: web.Request, seen: Seen) -> web.StreamResponse:
        kind = "application/json" if json else "text/event-stream"
        response = web.StreamResponse(headers={"Content-Type": kind})
        if json:
            response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"id": "x"' if json else b'data: {"n": 0}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    fake.hook = cut
    return fake


async def test_a_non_stream_answer_the_upstream_cuts_counts_as_a_failure(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    """Read whole before a byte is relayed, so the client gets a 502, and the breaker
    learns of the cut from the body that broke (``answers.StreamBody.broke``)."""
    upstream = cutting(await start_fake(), json=True)
    base = await start_gateway(make_config(
        [upstream.provider()], breaker={**EAGER, "cooldown": 60, "fail_fast": True},
        cache={"enabled": False}, retries={"max_attempts": 1}))
    body = {"model": "m", "messages": MESSAGES, "temperature": 1}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(f"{base}/v1/chat/completions", json=body) as response:
                assert response.status == 502
        async with session.post(f"{base}/v1/chat/completions", json=body) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "circuit_open"
    assert upstream.chats == 2


@pytest.mark.parametrize("shared", [False, True], ids=["direct", "deduplicated"])
async def test_streams_the_upstream_cuts_count_as_failures(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
    shared: bool,
) -> None:
    upstream = cutting(await start_fake())
    base = await start_gateway(make_config(
        [upstream.provider()], breaker={**EAGER, "cooldown": 60, "fail_fast": True},
        cache={"enabled": False}))
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
    assert upstream.chats == 2


async def test_a_failure_that_opens_the_circuit_is_relayed_not_retried_into_it(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    flaky(upstream := await start_fake(), 503)
    base = await start_gateway(make_config(
        [upstream.provider()], breaker={"min_requests": 1, "min_callers": 1, "cooldown": 60},
        retries={"max_attempts": 3, "base_delay": 0.01, "max_delay": 0.02}))
    async with aiohttp.ClientSession() as session:
        status, _, body = await post(session, base)
    assert (status, upstream.chats) == (503, 1)  # the upstream's answer, not circuit_open
    assert body["error"]["message"] == "failure 1"


async def test_an_open_breaker_with_no_other_deployment_still_sends_and_recovers(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    flaky(upstream := await start_fake(), 503)
    base = await start_gateway(make_config(
        [upstream.provider()], health_cache_ttl=0,
        breaker={**EAGER, "cooldown": 60}))
    async with aiohttp.ClientSession() as session:
        assert [(await post(session, base))[0] for _ in range(4)] == [503] * 4
        assert (await health(session, base))["state"] == "open"
        upstream.chat.status = 200
        assert (await post(session, base))[0] == 200  # sent anyway, long before the cooldown
        state = await health(session, base)
    assert upstream.chats == 5
    assert (state["state"], state["opened_total"], state["panic_total"]) == ("closed", 1, 3)
