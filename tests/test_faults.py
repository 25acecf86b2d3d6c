"""Upstream and client faults against the gateway as a real process (issue #4, "Fault
tests ... against real processes on loopback").

The same faults are tested in-process elsewhere (tests/test_errors.py,
test_upstream_timeouts.py, test_streaming.py, test_retries.py); there the gateway runs
on the test's asyncio loop. Here it is ``python -m proxy serve`` from a YAML file, on
uvloop, as deployed: how a refused connect, a cut upstream and a vanished client are
noticed is the event loop's business, so each fault is checked on the production loop.
Bounds are generous (a busy 2-core machine), and each elapsed time is printed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.assertions import assert_error
from tests.conftest import StartUpstream
from tests.faulty import CHAT, Faults, chat, providers
from tests.procs import Proc, gateway_process

READ_TIMEOUT = 1.0
# Retries on (conftest's make_config turns them off), quick, honouring Retry-After.
RETRIES = {"max_attempts": 2, "base_delay": 0.01, "max_delay": 0.05, "max_retry_after": 5}


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
def read_timeout() -> float:
    return READ_TIMEOUT


@pytest.fixture
async def gateway(faults: Faults, start_upstream: StartUpstream, closed_port: int,
                  tmp_path: Path, read_timeout: float) -> AsyncIterator[Proc]:
    upstream = await start_upstream(faults.app())
    config = {"providers": providers(upstream, closed_port), "cache": {"enabled": False},
              "timeouts": {"read": read_timeout}, "retries": RETRIES}
    async with gateway_process(tmp_path, config) as proc:
        yield proc


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as client:
        yield client


async def post(session: aiohttp.ClientSession, gateway: Proc, body: dict[str, Any]
               ) -> tuple[int, bytes, float]:
    started = time.monotonic()
    async with session.post(gateway.url + CHAT, json=body) as response:
        raw = await response.read()
    return response.status, raw, time.monotonic() - started


async def assert_serves(session: aiohttp.ClientSession, gateway: Proc) -> None:
    status, raw, _ = await post(session, gateway, chat("ok-m"))
    assert status == 200, raw
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == "fine"


async def test_refused_upstream_is_502_within_a_second(
        gateway: Proc, session: aiohttp.ClientSession) -> None:
    await assert_serves(session, gateway)  # warm: the process is up and routing
    status, raw, elapsed = await post(session, gateway, chat("dead-m"))
    print(f"refused upstream: {status} after {elapsed * 1000:.0f} ms")
    assert status == 502, raw
    assert_error(raw, "upstream_unreachable", type_="upstream_error")
    assert elapsed < 1.0


async def test_hanging_upstream_is_504_at_the_headers_timeout(
        gateway: Proc, session: aiohttp.ClientSession, faults: Faults) -> None:
    status, raw, elapsed = await post(session, gateway, chat("hang-m"))
    print(f"hanging upstream: {status} after {elapsed * 1000:.0f} ms "
          f"(timeouts.read {READ_TIMEOUT} s)")
    assert status == 504, raw
    # No response headers within timeouts.headers, which defaults to timeouts.read.
    assert_error(raw, "upstream_headers_timeout", type_="upstream_error")
    assert READ_TIMEOUT * 0.9 <= elapsed < READ_TIMEOUT + 1.0
    assert len(faults.calls["hang"]) == 1  # a timeout is not retried


async def test_upstream_cut_mid_stream_ends_with_an_sse_error_event(
        gateway: Proc, session: aiohttp.ClientSession) -> None:
    status, raw, _ = await post(session, gateway, chat("drop-m", stream=True))
    assert status == 200
    events = [e for e in raw.split(b"\n\n") if e and not e.startswith(b":")]
    assert b"[DONE]" not in raw
    assert len(events) == 3, raw  # both events relayed, then the error
    assert all(e.startswith(b"data: {") for e in events[:2])
    name, data = events[-1].split(b"\n")
    assert name == b"event: error"
    error = orjson.loads(data.removeprefix(b"data: "))["error"]
    assert sorted(error) == ["code", "message", "param", "type"]
    assert error["type"] == "upstream_error"
    await assert_serves(session, gateway)  # the next request is served


# The upstream's 3 s silence must not hit the read timeout: only the client leaving may
# end its request.
@pytest.mark.parametrize("read_timeout", [30.0])
async def test_client_gone_mid_stream_cancels_the_upstream_within_a_second(
        gateway: Proc, session: aiohttp.ClientSession, faults: Faults) -> None:
    response = await session.post(gateway.url + CHAT, json=chat("endless-m", stream=True))
    assert response.status == 200
    assert (await response.content.readline()).startswith(b"data: {")
    response.close()  # the client goes away: its connection is closed, not reused
    gone = time.monotonic()
    await asyncio.wait_for(faults.endless_cancelled.wait(), 5)
    took = faults.cancelled_at - gone
    print(f"client gone: upstream handler cancelled after {took * 1000:.1f} ms")
    assert took < 1.0
    await assert_serves(session, gateway)


async def test_429_with_retry_after_is_waited_out_then_succeeds(
        gateway: Proc, session: aiohttp.ClientSession, faults: Faults) -> None:
    status, raw, elapsed = await post(session, gateway, chat("flaky-m"))
    first, second = faults.calls["flaky"]
    print(f"429 + Retry-After: 1: retried after {(second - first) * 1000:.0f} ms, "
          f"client saw {status} after {elapsed * 1000:.0f} ms")
    assert status == 200, raw
    assert orjson.loads(raw)["id"] == "chatcmpl-ok"
    assert second - first >= 0.95
    assert 0.95 <= elapsed < 4
