"""Upstream retries (issue #4): on connection failures and 429/500/502/503/504, with
full-jitter backoff or the upstream's Retry-After (capped), ``max_attempts``, a retry
budget, and only before anything reached the client. Real upstreams on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from proxy.config.sections import RetryConfig
from proxy.resilience.retry import RetryPolicy, retry_after
from tests.conftest import MakeConfig, StartFake, StartGateway, StartLive
from tests.fake_upstream import CHAT, FakeUpstream, Reply, Seen, replaced
from tests.wire import Conn, raw_servers

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
FAST = {"max_attempts": 3, "base_delay": 0.01, "max_delay": 0.05}


def scripted(fake: FakeUpstream, statuses: list[int],
             headers: dict[str, str] | None = None) -> FakeUpstream:
    """``fake`` answers the statuses in turn (with ``headers``), 200 once they run out;
    its kept requests say when each call came (``Seen.at``)."""
    async def hook(request: web.Request, seen: Seen) -> Reply | None:
        if seen.call > len(statuses) or statuses[seen.call - 1] == 200:
            return None
        return replaced(fake.chat, status=statuses[seen.call - 1], headers=headers or {})

    fake.hook = hook
    return fake


def arrivals(fake: FakeUpstream) -> list[float]:
    return [seen.at for seen in fake.requests if seen.path == CHAT]


async def gateway(fake: FakeUpstream, live_gateway: StartLive, **retries: Any) -> str:
    return (await live_gateway(fake, retries={**FAST, **retries})).url


async def chat(base: str, **headers: str) -> tuple[int, dict[str, str], Any]:
    async with (aiohttp.ClientSession() as session,
                session.post(f"{base}/v1/chat/completions", headers=headers,
                             json={"model": "m", "messages": MESSAGES}) as response):
        return response.status, dict(response.headers), await response.json()


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_retryable_statuses_are_retried_until_success(
    status: int, start_fake: StartFake, live_gateway: StartLive,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    upstream = scripted(await start_fake(), [status, status])
    base = await gateway(upstream, live_gateway)
    answer = await openai_client(base).chat.completions.create(model="m", messages=MESSAGES)
    assert answer.id == "answer-3"
    assert upstream.chats == 3


async def test_the_last_failure_is_relayed_after_max_attempts(
    start_fake: StartFake, live_gateway: StartLive,
) -> None:
    upstream = scripted(await start_fake(), [503] * 5)
    status, _, body = await chat(await gateway(upstream, live_gateway))
    assert status == 503
    assert body["error"]["message"] == "failure 3"  # the upstream's own, third answer
    assert upstream.chats == 3


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_other_statuses_are_not_retried(
    status: int, start_fake: StartFake, live_gateway: StartLive,
) -> None:
    upstream = scripted(await start_fake(), [status])
    assert (await chat(await gateway(upstream, live_gateway)))[0] == status
    assert upstream.chats == 1


async def test_retry_after_is_honoured(
    start_fake: StartFake, live_gateway: StartLive,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    upstream = scripted(await start_fake(), [429], headers={"Retry-After": "1"})
    base = await gateway(upstream, live_gateway)
    started = time.monotonic()
    answer = await openai_client(base).chat.completions.create(model="m", messages=MESSAGES)
    assert answer.id == "answer-2"
    calls = arrivals(upstream)
    assert calls[1] - calls[0] >= 0.95, "the wait must honour Retry-After: 1"
    assert time.monotonic() - started < 3


async def test_a_retry_after_over_the_cap_goes_to_the_client(
    start_fake: StartFake, live_gateway: StartLive,
) -> None:
    upstream = scripted(await start_fake(), [429], headers={"Retry-After": "120"})
    base = await gateway(upstream, live_gateway, max_retry_after=5)
    status, headers, _ = await chat(base)
    assert (status, headers["Retry-After"]) == (429, "120")
    assert upstream.chats == 1


async def test_an_upstream_that_drops_connections_is_retried_then_502(
    start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    accepted: list[str] = []

    async def drop(conn: Conn) -> None:
        async for request in conn:  # closes without answering
            accepted.append(request.target)
            return

    async with raw_servers() as start_raw:
        upstream = await start_raw(drop)
        base = await start_gateway(make_config(
            [{"name": "up", "type": "openai_compat", "base_url": upstream.url,
              "models": ["m"]}], retries=FAST))
        status, _, body = await chat(base)
    assert status == 502 and body["error"]["code"] == "upstream_unreachable"
    assert len(accepted) == 3


def test_backoff_is_full_jitter_and_capped() -> None:
    draws = iter([1.0, 1.0, 1.0, 0.5])
    policy = RetryPolicy(RetryConfig(max_attempts=10, base_delay=0.25, max_delay=1.0),
                         draw=lambda: next(draws))
    for _ in range(20):
        policy.record_request()
    assert [policy.after_error(n) for n in (1, 2, 3, 4)] == [0.25, 0.5, 1.0, 0.5]


def test_max_attempts_counts_the_first_try() -> None:
    policy = RetryPolicy(RetryConfig(max_attempts=2), draw=lambda: 0.0)
    policy.record_request()
    assert policy.after_status(1, 503, {}) == 0.0
    assert policy.after_status(2, 503, {}) is None
    assert RetryPolicy(RetryConfig(max_attempts=1)).after_error(1) is None


def test_the_budget_bounds_retries_to_a_share_of_requests() -> None:
    now = [0.0]
    policy = RetryPolicy(RetryConfig(max_attempts=5, budget=0.2), clock=lambda: now[0],
                         draw=lambda: 0.0)
    for _ in range(50):
        policy.record_request()
    allowed = [policy.after_error(1) is not None for _ in range(20)]
    assert allowed.count(True) == 10  # 20 % of 50
    now[0] = 11.0  # the window moved on: only the minimum is left for a quiet gateway
    assert [policy.after_error(1) is not None for _ in range(5)].count(True) == 3


@pytest.mark.parametrize(("value", "seconds"), [
    ("3", 3.0), (" 1.5 ", 1.5), ("-2", 0.0), ("soon", None), (None, None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0)])
def test_retry_after_parsing(value: str | None, seconds: float | None) -> None:
    assert retry_after(value) == seconds


def test_the_budget_keeps_only_its_window() -> None:
    now = [0.0]
    policy = RetryPolicy(RetryConfig(), clock=lambda: now[0])
    for second in range(100):
        now[0] = float(second)
        for _ in range(100):
            policy.record_request()
    assert "requests=1100" in repr(policy)  # 11 seconds of 100, not 10,000
