"""``GET /v1/usage`` across processes (issue 10): ``--workers 2`` without Redis (the
worker answering asks its peer over its unix socket, proven by the peer HMAC, and sums)
and two gateways sharing one Redis (``usage.backend: redis``), flushed at shutdown too.
Real ``proxy serve`` processes, the upstream of tests/usage_fake.py in the test's loop."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from proxy.config.worker import WorkerSpec
from tests.conftest import StartUpstream
from tests.procs import free_port, spawn, stop, wait_for_sockets
from tests.redis_server import RedisServer, gateway_processes
from tests.usage_fake import UsageUpstream
from tests.usage_helpers import CHAT, KEYS, SECRETS, STREAM, get_usage, row


def config(upstream: str, **raw: Any) -> dict[str, Any]:
    return {"providers": [{"name": "u", "type": "openai_compat", "base_url": f"{upstream}/v1",
                           "models": ["m"]}], "cache": {"enabled": False}, **raw}


@asynccontextmanager
async def two_workers(raw: dict[str, Any], tmp_path: Path) -> AsyncIterator[list[Path]]:
    socket_dir = tmp_path / "sockets"
    socket_dir.mkdir()
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    proxy = spawn("proxy", [sys.executable, "-m", "proxy", "serve", "--config", str(path),
                            "--workers", "2", "--socket-dir", str(socket_dir),
                            "--port", str(free_port())], tmp_path)
    sockets = list(WorkerSpec(0, 2, socket_dir).peers)
    try:
        await wait_for_sockets(sockets, [proxy], within=30)
        yield sockets
    finally:
        await stop(proxy)
        print(proxy.output())


async def over(socket: Path, method: str, path: str, secret: str,
               body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    connector = aiohttp.UnixConnector(path=str(socket))
    async with (aiohttp.ClientSession(connector=connector,
                                      timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.request(method, f"http://gateway{path}",
                                data=orjson.dumps(body) if body else None,
                                headers={"Authorization": f"Bearer {secret}",
                                         "Content-Type": "application/json"}) as response):
        return response.status, await response.read()


async def test_two_workers_without_redis_sum_their_totals(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    """Alice's requests go to worker 0, Bob's to worker 1; deterministic ones may be
    forwarded to the worker owning their key and are still counted once."""
    fake = UsageUpstream()
    upstream = await start_upstream(fake.app())
    async with two_workers(config(upstream, auth={"keys": KEYS}), tmp_path) as sockets:
        first, second = sockets
        for i in range(3):
            deterministic = {**CHAT, "temperature": 0, "seed": i}
            assert (await over(first, "POST", "/v1/chat/completions", SECRETS["alice"],
                               deterministic))[0] == 200
        for body in (CHAT, STREAM, {**STREAM, "temperature": 0}):
            status, answer = await over(second, "POST", "/v1/chat/completions",
                                        SECRETS["bob"], body)
            assert status == 200
            assert (b'"usage"' in answer) == (body is CHAT)  # no stream asked for it
        status, raw = await over(second, "GET", "/v1/usage", SECRETS["ops"])
        _, alice_raw = await over(second, "GET", "/v1/usage", SECRETS["alice"])
    totals, alice = orjson.loads(raw), orjson.loads(alice_raw)
    assert status == 200, totals
    assert (totals["workers"], totals["complete"]) == (2, True)
    assert totals["data"] == [row("alice", 3), row("bob", 3)]
    assert alice["data"] == [row("alice", 3)]  # made in worker 0, asked of worker 1
    assert len(fake.bodies) == 6  # one upstream call each


@pytest.fixture
def redis_config(start_upstream: StartUpstream, redis_server: RedisServer
                 ) -> tuple[UsageUpstream, Any]:
    fake = UsageUpstream()

    async def make(interval: float) -> dict[str, Any]:
        upstream = await start_upstream(fake.app())
        return config(upstream, redis={"url": redis_server.url},
                      usage={"backend": "redis", "flush_interval": interval})

    return fake, make


async def test_two_gateways_share_their_totals_in_redis(
    redis_config: tuple[UsageUpstream, Any], tmp_path: Path,
) -> None:
    fake, make = redis_config
    async with gateway_processes(await make(0.2), tmp_path) as (urls, _):
        async with aiohttp.ClientSession() as session:
            for url, count in zip(urls, (2, 1), strict=True):
                for _ in range(count):
                    async with session.post(f"{url}/v1/chat/completions", json=CHAT) as r:
                        assert r.status == 200
        expected = [{**row("anyone", 3), "key": None}]
        for _ in range(100):  # the other gateway flushes within 0.2 s
            status, totals = await get_usage(urls[0])
            if totals.get("data") == expected:
                break
            await asyncio.sleep(0.05)
    assert status == 200 and totals["backend"] == "redis"
    assert totals["data"] == expected
    assert len(fake.bodies) == 3


async def test_a_gateway_flushes_its_totals_when_it_stops(
    redis_config: tuple[UsageUpstream, Any], tmp_path: Path, redis_server: RedisServer,
) -> None:
    """A flush interval far longer than the test: only the shutdown flush writes."""
    _, make = redis_config
    raw = await make(600)
    async with (gateway_processes(raw, tmp_path, count=1) as (urls, _),
                aiohttp.ClientSession() as session,
                session.post(f"{urls[0]}/v1/chat/completions", json=STREAM) as r):
        assert r.status == 200
        await r.read()
    async with gateway_processes(raw, tmp_path, count=1) as (urls, _):
        status, totals = await get_usage(urls[0])
    assert status == 200
    assert totals["data"] == [{**row("anyone", 1), "key": None}]
