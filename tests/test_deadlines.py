"""Deadlines for every phase of an upstream answer (issue #4): connect, response headers,
first token, the silence between two reads and the whole answer, set in ``timeouts:``
and overridden per provider. Each expiry is its own 504 while the client has seen
nothing, and an SSE ``error`` event once its stream began. The counting fake upstream
(tests/fake_upstream.py) on loopback, its gate closed so that an answer hangs; the
official SDK where a client is natural."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web

from proxy.config.loader import ConfigError, Overrides, config_from_dict, load_config
from proxy.config.timeouts import TimeoutOverrides, Timeouts
from proxy.providers import PROVIDER_TYPES
from proxy.upstream.deadlines import Deadlines
from tests.conftest import MakeConfig, StartFake, StartGateway
from tests.fake_upstream import FakeUpstream, Reply, Seen
from tests.wire import CHAT, error_code, fetch, gateway

LIMIT = 0.3  # the deadline a test is about
SLACK = 1.5  # how late it may fire on a busy 2-core machine
LONG = 5.0  # the deadlines a test is not about
CHAT_PATH = "/v1/chat/completions"
STREAM = {**CHAT, "stream": True}
DONE = b"data: [DONE]\n\n"


def event(n: int) -> bytes:
    chunk = {"id": "chatcmpl-d", "object": "chat.completion.chunk", "created": 1,
             "model": "m", "choices": [{"index": 0, "delta": {"content": f"w{n} "},
                                        "finish_reason": None}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


@pytest.fixture
async def fake(start_fake: StartFake) -> AsyncIterator[FakeUpstream]:
    """The fake upstream, its chat gate closed: a JSON answer hangs before its head, a
    stream after it, until the test is over (then the gate opens, so no server shutdown
    waits on it). Asked for before ``start_gateway`` so the gateway stops first."""
    made = await start_fake()
    made.chat.gate = closed = asyncio.Event()
    yield made
    closed.set()


async def hang(fake: FakeUpstream) -> None:
    """What a hook that wrote part of an answer does next: wait on the closed gate."""
    assert fake.chat.gate is not None
    await fake.chat.gate.wait()


def steady(fake: FakeUpstream, events: tuple[bytes, ...], interval: float) -> str:
    """``fake`` streams ``events``, ``interval`` before each, without hanging."""
    fake.chat.gate, fake.chat.events, fake.chat.interval = None, events, interval
    return fake.url


async def sse_head(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


def message(body: bytes) -> str:
    _, marker, rest = body.partition(b"event: error\ndata: ")
    text: str = orjson.loads(rest.split(b"\n", 1)[0] if marker else body)["error"]["message"]
    return text


async def timed_fetch(url: str, body: dict[str, Any]) -> tuple[int, bytes, float]:
    started = time.perf_counter()
    status, _, answer = await fetch(f"{url}{CHAT_PATH}", body=body)
    return status, answer, time.perf_counter() - started


# --- before the client got anything: a 504 per deadline ----------------------------------

async def test_no_response_headers_is_504_upstream_headers_timeout(
        fake: FakeUpstream, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    url = fake.url
    base = await gateway(start_gateway, make_config, url,
                         timeouts={"headers": LIMIT, "read": LONG})
    status, body, elapsed = await timed_fetch(base, CHAT)
    assert (status, error_code(body)) == (504, "upstream_headers_timeout")
    assert LIMIT * 0.8 < elapsed < LIMIT + SLACK
    text = message(body)
    assert "'prov'" in text and "0.3 s" in text and "timeouts.headers" in text
    assert url.split(":")[-1].split("/")[0] not in text  # never the upstream's address


@pytest.mark.parametrize(("first", "code"), [(b"", "first_token_timeout"),
                                             (b'{"id": "chatcmpl-d",', "stream_stalled")])
async def test_a_non_stream_body_that_stalls_is_504(
        first: bytes, code: str, fake: FakeUpstream, start_gateway: StartGateway,
        make_config: MakeConfig) -> None:
    async def stalling(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if first:
            await response.write(first)
        await hang(fake)
        return response

    fake.hook = stalling
    base = await gateway(start_gateway, make_config, fake.url,
                         timeouts={"first_token": LIMIT, "read": LIMIT, "headers": LONG})
    status, body, elapsed = await timed_fetch(base, CHAT)
    assert (status, error_code(body)) == (504, code)  # a clean status: nothing was sent
    assert LIMIT * 0.8 < elapsed < LIMIT + SLACK


async def test_total_bounds_the_wait_for_headers_too(
        fake: FakeUpstream, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    base = await gateway(start_gateway, make_config, fake.url,
                         timeouts={"total": LIMIT, "read": LONG})
    status, body, elapsed = await timed_fetch(base, CHAT)
    assert (status, error_code(body)) == (504, "request_timeout")
    assert "timeouts.total" in message(body)
    assert LIMIT * 0.8 < elapsed < LIMIT + SLACK


async def test_a_provider_connect_timeout_overrides_the_global_one(
        unanswered_port: int, start_gateway: StartGateway,
        make_config: MakeConfig) -> None:
    provider = {"name": "prov", "type": "openai_compat", "models": ["m"],
                "base_url": f"http://127.0.0.1:{unanswered_port}/v1",
                "timeouts": {"connect": LIMIT}}
    base = await start_gateway(make_config([provider], timeouts={"connect": LONG}))
    status, body, elapsed = await timed_fetch(base, CHAT)
    assert (status, error_code(body)) == (504, "connect_timeout")
    assert LIMIT * 0.8 < elapsed < LIMIT + SLACK
    assert "timeouts.connect" in message(body) and str(unanswered_port) not in message(body)


async def test_per_provider_timeouts_win_over_the_global_ones(
        fake: FakeUpstream, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    url = fake.url
    base = await start_gateway(make_config([
        {"name": "fast", "type": "openai_compat", "base_url": url, "models": ["f"],
         "timeouts": {"headers": LIMIT}},
        {"name": "slow", "type": "openai_compat", "base_url": url, "models": ["s"]},
    ], timeouts={"headers": 1.2, "read": LONG}))
    (_, fast, fast_took), (_, slow, slow_took) = await asyncio.gather(
        timed_fetch(base, {**CHAT, "model": "f"}), timed_fetch(base, {**CHAT, "model": "s"}))
    assert error_code(fast) == error_code(slow) == "upstream_headers_timeout"
    assert "'fast'" in message(fast) and "0.3 s" in message(fast)
    assert "'slow'" in message(slow) and "1.2 s" in message(slow)
    assert fast_took < 1.0 <= slow_took < 1.2 + SLACK


# --- after the stream began: an SSE error event, and the stream ends ---------------------

async def test_headers_then_nothing_keeps_alive_then_ends_with_first_token_timeout(
        fake: FakeUpstream, start_gateway: StartGateway, make_config: MakeConfig,
        openai_client: Callable[..., openai.AsyncOpenAI]) -> None:
    base = await gateway(start_gateway, make_config, fake.url, timeouts={
        "first_token": 0.8, "read": LONG, "headers": LONG, "sse_keepalive": 0.2})
    status, body, elapsed = await timed_fetch(base, STREAM)
    comments, marker, rest = body.partition(b"event: error\n")
    assert status == 200 and marker and DONE not in body
    assert comments.count(b": keep-alive\n\n") >= 2
    assert comments == b": keep-alive\n\n" * comments.count(b": keep-alive\n\n")
    assert error_code(body) == "first_token_timeout"
    assert rest.endswith(b"\n\n") and rest.count(b"\n\n") == 1  # then the stream closed
    assert 0.8 * 0.8 < elapsed < 0.8 + SLACK

    stream = await openai_client(base).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError) as raised:
        async for _ in stream:
            pass
    assert raised.value.code == "first_token_timeout"
    assert "first token" in raised.value.message and "'prov'" in raised.value.message


async def test_a_stalled_stream_ends_with_stream_stalled_and_the_gateway_serves_on(
        fake: FakeUpstream, start_gateway: StartGateway, make_config: MakeConfig,
        openai_client: Callable[..., openai.AsyncOpenAI]) -> None:
    answered = Reply(body={"id": "c", "object": "chat.completion", "created": 0,
                           "model": "m", "choices": []})

    async def stalling(request: web.Request, seen: Seen) -> Reply | web.StreamResponse:
        if not seen.json().get("stream"):
            return answered
        response = await sse_head(request)
        for n in range(2):
            await response.write(event(n))
        await hang(fake)
        return response

    fake.hook = stalling
    base = await gateway(start_gateway, make_config, fake.url, timeouts={
        "read": LIMIT, "first_token": LONG, "headers": LONG})
    status, body, elapsed = await timed_fetch(base, STREAM)
    events = body.partition(b"event: error\n")[0]
    assert (status, events, error_code(body)) == (200, event(0) + event(1), "stream_stalled")
    assert DONE not in body
    assert LIMIT * 0.8 < elapsed < LIMIT + SLACK

    sdk = openai_client(base)
    stream = await sdk.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    received = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["w0 ", "w1 "]
    assert raised.value.code == "stream_stalled" and "timeouts.read" in raised.value.message
    answer = await sdk.chat.completions.create(model="m", messages=[
        {"role": "user", "content": "again"}])
    assert answer.id == "c"


async def test_a_slow_steady_stream_longer_than_every_limit_is_not_cut(
        fake: FakeUpstream, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    events = [event(n) for n in range(9)]  # 1.35 s in all, each gap well under the limits
    base = await gateway(start_gateway, make_config, steady(fake, (*events, DONE), 0.15),
                         timeouts={
        "headers": 0.6, "first_token": 0.6, "read": 0.6})
    status, body, elapsed = await timed_fetch(base, STREAM)
    assert (status, body) == (200, b"".join(events) + DONE)
    assert elapsed > 1.2


async def test_total_cuts_a_long_steady_stream_with_request_timeout(
        fake: FakeUpstream, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    long = tuple(event(n) for n in range(100))  # 10 s, were it not cut
    base = await gateway(start_gateway, make_config, steady(fake, long, 0.1),
                         timeouts={"total": 1.0, "read": LONG})
    status, body, elapsed = await timed_fetch(base, STREAM)
    events = body.partition(b"event: error\n")[0]
    assert (status, error_code(body)) == (200, "request_timeout")
    assert 3 <= events.count(b"data: ") <= 11 and DONE not in body
    assert 0.8 < elapsed < 1.0 + SLACK


# --- retries and the circuit breaker -----------------------------------------------------

@pytest.mark.parametrize(("sends_head", "code"), [
    (False, "upstream_headers_timeout"),  # the request may still run upstream
    (True, "first_token_timeout"),  # an answer began
])
async def test_deadlines_after_the_request_was_sent_are_not_retried(
        sends_head: bool, code: str, fake: FakeUpstream,
        start_gateway: StartGateway, make_config: MakeConfig) -> None:
    async def sse_then_nothing(request: web.Request, seen: Seen) -> web.StreamResponse:
        response = await sse_head(request)  # to a JSON request: a head, then silence
        await hang(fake)
        return response

    if sends_head:
        fake.hook = sse_then_nothing
    base = await gateway(start_gateway, make_config, fake.url,
                         timeouts={"headers": LIMIT, "first_token": LIMIT},
                         retries={"max_attempts": 2, "base_delay": 0.01})
    _, body, _ = await timed_fetch(base, CHAT)
    assert error_code(body) == code
    assert fake.chats == 1


async def test_first_token_timeouts_do_not_open_the_circuit_breaker(
        fake: FakeUpstream, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    """A long generation is that request's, not the upstream's health (issue #9)."""
    base = await gateway(start_gateway, make_config, fake.url,  # a 200 head, then nothing
                         timeouts={"first_token": LIMIT},
                         breaker={"min_requests": 2, "min_callers": 1, "cooldown": LONG,
                                  "fail_fast": True})
    for _ in range(3):
        assert error_code((await timed_fetch(base, STREAM))[1]) == "first_token_timeout"
    assert fake.chats == 3


# --- configuration ------------------------------------------------------------------------

def test_headers_and_first_token_default_to_read_and_providers_override_key_by_key() -> None:
    assert Deadlines.of(Timeouts(read=7.0)) == Deadlines(5.0, 7.0, 7.0, 7.0, None)
    assert Deadlines.of(Timeouts(headers=2.0, total=600.0), TimeoutOverrides(
        read=9.0, total=0.0)) == Deadlines(5.0, 2.0, 9.0, 9.0, None)
    config = config_from_dict({"timeouts": {"first_token": 3, "total": None}, "providers": [
        {"name": "p", "type": "openai_compat", "base_url": "http://127.0.0.1:1/v1",
         "timeouts": {"headers": 1, "total": 60}}]}, {}, PROVIDER_TYPES.keys())
    assert Deadlines.of(config.timeouts, config.providers[0].timeouts) == Deadlines(
        5.0, 1.0, 3.0, 300.0, 60.0)
    from_env = load_config(Overrides(), {"PROXY_TOTAL_TIMEOUT": "600"}, PROVIDER_TYPES.keys())
    assert from_env.timeouts.total == 600.0


def test_bad_provider_timeouts_are_reported_with_their_key_path() -> None:
    with pytest.raises(ConfigError) as raised:
        config_from_dict({"timeouts": {"headers": 0}, "providers": [
            {"name": "p", "type": "openai_compat", "base_url": "http://127.0.0.1:1/v1",
             "timeouts": {"idle": 1, "first_token": -1, "discovery": 2}}]}, {},
            PROVIDER_TYPES.keys())
    problems = sorted(p.split(":")[0] for p in raised.value.problems)
    assert problems == ["providers[0].timeouts.discovery", "providers[0].timeouts.first_token",
                        "providers[0].timeouts.idle", "timeouts.headers"]
