"""Gateway failures (5xx) a client gets are logged, throttled per error code (issue #4:
an operator must see an outage in the log, and an outage must not flood it)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest

from proxy.errors import UpstreamUnreachable
from proxy.failure_log import FailureLog
from tests.conftest import MakeConfig, StartGateway
from tests.wire import post_json

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_an_unreachable_upstream_is_logged_once_per_second(
    make_config: MakeConfig, start_gateway: StartGateway, closed_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config([{"name": "dead", "type": "openai_compat", "models": ["m"],
                           "base_url": f"http://127.0.0.1:{closed_port}/v1",
                           "api_key_env": "UP_KEY"}], env={"UP_KEY": "sk-up-secret-77"},
                         breaker={"failures": 0})
    gateway = await start_gateway(config)
    caplog.set_level(logging.WARNING, "proxy.errors")
    async with aiohttp.ClientSession() as session:
        replies = [await post_json(session, f"{gateway}/v1/chat/completions", CHAT)
                   for _ in range(10)]
    assert {status for status, _, _ in replies} == {502}
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.errors"]
    assert len(lines) == 1, lines
    request_id = replies[0][1]["X-Request-ID"]
    assert lines[0].startswith(f"POST /v1/chat/completions -> 502 upstream_unreachable "
                               f"[request {request_id}]")
    assert "sk-up-secret-77" not in caplog.text


async def test_folded_failures_are_counted_in_the_next_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "proxy.errors")
    failures = FailureLog(interval=0.05)
    error = UpstreamUnreachable("Provider 'p' did not answer.")
    for _ in range(5):
        failures("POST /v1/x", "id", error)
    await asyncio.sleep(0.06)
    failures("POST /v1/x", "id", error)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[1].endswith("(and 4 more since the last line)")
