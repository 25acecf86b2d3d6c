"""Cross-worker deduplication (issue #3): identical requests that land in different
worker processes still share one upstream call, because each is forwarded to the
worker that owns its key (proxy/sharing/peers.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import StartFake
from tests.fake_upstream import FakeUpstream
from tests.procs import free_port, fresh_connections, poll_healthz, spawn_proxy, stop

CHAT = "/v1/chat/completions"


async def _post(session: aiohttp.ClientSession, url: str, temperature: float
                ) -> tuple[int, bytes, str]:
    body = orjson.dumps({"model": "m", "temperature": temperature,
                         "messages": [{"role": "user", "content": "same"}]})
    async with session.post(url, data=body,
                            headers={"Content-Type": "application/json"}) as response:
        return response.status, await response.read(), response.headers.get(
            "X-Gateway-Dedup", "")


async def test_identical_requests_on_two_workers_make_one_upstream_call(
    start_fake: StartFake, tmp_path: Path,
) -> None:
    upstream = await start_fake(latency=0.4)
    port = free_port()
    proxy = spawn_proxy(["--workers", "2", "--port", str(port),
                         "--upstream", upstream.url], tmp_path)
    try:
        async with fresh_connections() as session:
            seen = await poll_healthz(session, f"http://127.0.0.1:{port}/healthz",
                                      lambda s: len(set(s.values())) == 2, [proxy])
            assert sorted(set(seen.values())) == [0, 1]
            url = f"http://127.0.0.1:{port}{CHAT}"
            answers = await asyncio.gather(*(_post(session, url, 0) for _ in range(20)))
            assert [status for status, _, _ in answers] == [200] * 20, proxy.output()
            assert len({body for _, body, _ in answers}) == 1
            roles = sorted(role for _, _, role in answers)
            assert roles == ["follower"] * 19 + ["leader"]
            assert upstream.chats == 1, proxy.output()
            # Sampled requests are not shared, across workers either.
            sampled = await asyncio.gather(*(_post(session, url, 0.7) for _ in range(4)))
            assert [status for status, _, _ in sampled] == [200] * 4
            assert upstream.chats == 5
    finally:
        assert await stop(proxy) == 0, proxy.output()


async def test_the_clients_cache_headers_reach_the_owning_worker(
    fake_upstream: FakeUpstream, tmp_path: Path,
) -> None:
    """``X-Gateway-Cache`` never goes upstream, but it must go with a request forwarded
    to the worker that owns its key, or that worker would decide differently."""
    port = free_port()
    proxy = spawn_proxy(["--workers", "2", "--port", str(port),
                         "--upstream", fake_upstream.url], tmp_path)
    try:
        async with fresh_connections() as session:
            await poll_healthz(session, f"http://127.0.0.1:{port}/healthz",
                               lambda s: len(set(s.values())) == 2, [proxy])
            url = f"http://127.0.0.1:{port}{CHAT}"
            body = orjson.dumps({"model": "m", "temperature": 0,
                                 "messages": [{"role": "user", "content": "x"}]})
            caches = []
            for _ in range(8):  # fresh connections: both workers receive some
                async with session.post(url, data=body, headers={
                        "Content-Type": "application/json",
                        "X-Gateway-Cache": "off"}) as response:
                    assert response.status == 200
                    caches.append(response.headers.get("X-Cache"))
            assert caches == [None] * 8, caches
            assert fake_upstream.chats == 8
    finally:
        assert await stop(proxy) == 0, proxy.output()


async def test_a_forwarded_request_waits_as_long_as_the_owner_does(
    start_fake: StartFake, tmp_path: Path,
) -> None:
    """The owner runs the call under the provider's deadlines (here headers 5 s, longer
    than read 0.2 s); the hop to it must not give up first with a 502."""
    upstream = await start_fake(latency=0.4)  # answers after 0.4 s
    port = free_port()
    config = tmp_path / "proxy.yaml"
    config.write_text("timeouts: {read: 0.2, headers: 5}\n")
    proxy = spawn_proxy(["--workers", "2", "--port", str(port), "--config", str(config),
                         "--upstream", upstream.url], tmp_path)
    try:
        async with fresh_connections() as session:
            await poll_healthz(session, f"http://127.0.0.1:{port}/healthz",
                               lambda s: len(set(s.values())) == 2, [proxy])
            url = f"http://127.0.0.1:{port}{CHAT}"
            answers = await asyncio.gather(*(_post(session, url, 0) for _ in range(10)))
        assert [status for status, _, _ in answers] == [200] * 10, proxy.output()
        assert upstream.chats == 1
    finally:
        assert await stop(proxy) == 0, proxy.output()
