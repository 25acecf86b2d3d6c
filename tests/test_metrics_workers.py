"""``GET /metrics`` with ``proxy serve --workers 2`` as real processes (issue 10,
"correct with --workers N"): traffic spread over both workers by SO_REUSEPORT, scraped
on either, sums exactly; a worker killed and restarted takes nothing back from the
counters, and its in-flight requests stop counting; each gateway has its own metrics
directory, removed at exit."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy import __version__
from proxy.config.keys import hash_secret
from tests.assertions import Samples, parse, value
from tests.conftest import MockUpstream
from tests.procs import Spawned, free_port, fresh_connections, spawn_with_env, stop

ADMIN, TEAM = "sk-gw-admin-55555555555", "sk-gw-team-66666666666"
CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
OK = {"route": CHAT, "model": "m", "provider": "up", "status": "200"}
HEALTHZ = {"route": "/healthz", "model": "none", "provider": "none", "status": "200"}


def config_file(tmp_path: Path, upstream: str, name: str, dedup: str = "off") -> Path:
    """``dedup: off`` (and no cache): no request is forwarded to a peer worker."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "providers": [{"name": "up", "type": "openai_compat", "base_url": upstream,
                       "models": ["m"]}],
        "dedup": {"mode": dedup}, "cache": {"enabled": False},
        "auth": {"keys": [{"name": "ops", "sha256": hash_secret(ADMIN), "admin": True},
                          {"name": "team-a", "sha256": hash_secret(TEAM)}]}}))
    return path


def spawn_gateway(tmp_path: Path, upstream: str, port: int, tmpdir: Path, name: str,
                  *extra: str, dedup: str = "off") -> Spawned:
    """``--workers 2`` with ``TMPDIR`` pointing where the test looks for the directory."""
    argv = [sys.executable, "-m", "proxy", "serve", "--workers", "2", "--port", str(port),
            "--config", str(config_file(tmp_path, upstream, name, dedup)), *extra]
    return spawn_with_env(name, argv, tmp_path, {"TMPDIR": str(tmpdir)})


async def healthz_until(session: aiohttp.ClientSession, url: str, proc: Spawned,
                        done: Callable[[dict[int, int]], bool], within: float = 20.0
                        ) -> tuple[dict[int, int], int]:
    """GET /healthz until ``done(pid -> worker index)``; also how many were answered
    (each one is a request the metrics count)."""
    seen: dict[int, int] = {}
    answered = 0
    deadline = time.monotonic() + within
    while not done(seen):
        if proc.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"healthz: saw {seen}\n{proc.output()}")
        try:
            async with session.get(f"{url}/healthz") as response:
                body = await response.json()
            seen[body["pid"]] = body["worker"]
            answered += 1
        except (aiohttp.ClientError, TimeoutError):
            await asyncio.sleep(0.05)
    return seen, answered


async def chats(session: aiohttp.ClientSession, url: str, count: int,
                shared: bool = False) -> set[str]:
    """``count`` chats on fresh connections; the workers that answered, told apart by
    their request ids' per-process prefix (middlewares._ID_PREFIX). ``shared``: each a
    different deterministic request, which the worker owning its key answers."""
    prefixes = set()
    for i in range(count):
        body = {**BODY, "temperature": 0, "seed": i} if shared else BODY
        async with session.post(f"{url}{CHAT}", json=body,
                                headers={"Authorization": f"Bearer {TEAM}"}) as response:
            assert response.status == 200, await response.text()
            await response.read()
            prefixes.add(response.headers["X-Request-ID"][:16])
    return prefixes


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(f"{url}/metrics",
                           headers={"Authorization": f"Bearer {ADMIN}"}) as response:
        assert response.status == 200, await response.text()
        return parse(await response.text())


def counters(samples: Samples) -> dict[Any, float]:
    return {k: v for k, v in samples.items()
            if k[0].endswith(("_total", "_count", "_sum", "_bucket"))}


async def slow_chat_on(socket: Path) -> None:
    """A chat held 20 s upstream, sent to one worker through its unix socket."""
    connector = aiohttp.UnixConnector(path=str(socket))
    async with aiohttp.ClientSession(connector=connector) as session:
        await session.post(f"http://worker{CHAT}", json=BODY, headers={
            "Authorization": f"Bearer {TEAM}", "X-Mock-Latency": "20"})


async def until_value(session: aiohttp.ClientSession, url: str, name: str, wanted: float,
                      proc: Spawned, **labels: str) -> Samples:
    deadline = time.monotonic() + 15
    while True:
        samples = await scrape(session, url)
        if value(samples, name, **labels) == wanted:
            return samples
        if time.monotonic() > deadline:
            pytest.fail(f"{name}{labels} = {value(samples, name, **labels)}, wanted "
                        f"{wanted}\n{proc.output()}")
        await asyncio.sleep(0.1)


async def test_two_workers_sum_exactly_and_survive_a_killed_worker(
    mock_upstream: MockUpstream, tmp_path: Path, socket_dir: Path,
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proxy = spawn_gateway(tmp_path, mock_upstream.url, port, tmpdir, "gateway",
                          "--socket-dir", str(socket_dir))
    slow: asyncio.Future[None] | None = None
    try:
        async with fresh_connections() as session:
            first, polled = await healthz_until(session, url, proxy, lambda s: len(s) == 2)
            assert sorted(first.values()) == [0, 1]
            assert len(await chats(session, url, 40)) == 2, "one worker served every chat"
            # Each worker hands its figures on once a second (observe/metrics_pending.py).
            samples = await until_value(session, url, "gateway_requests_total", 40, proxy,
                                        **OK)
            assert value(samples, "gateway_requests_total", **HEALTHZ) == polled
            assert value(samples, "http_server_request_duration_seconds_count",
                         http_request_method="POST", http_route=CHAT,
                         http_response_status_code="200") == 40
            assert value(samples, "gateway_upstream_attempts_total", outcome="success") == 40
            # Gauges too are each worker's as of its last flush: one a second.
            await until_value(session, url, "gateway_requests_in_flight", 1, proxy)
            assert value(samples, "gateway_build_info", version=__version__) == 1

            slow = asyncio.ensure_future(slow_chat_on(socket_dir / "worker-0.sock"))
            held = await until_value(session, url, "gateway_requests_in_flight", 2, proxy)
            victim = next(pid for pid, index in first.items() if index == 0)
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(aiohttp.ClientError):
                await slow
            _, polled_after = await healthz_until(
                session, url, proxy,
                lambda s: any(i == 0 and pid not in first for pid, i in s.items()))
            after = await until_value(session, url, "gateway_requests_total",
                                      polled + polled_after, proxy, **HEALTHZ)
            # Not the dead worker's request (its file is gone), however long we wait.
            await until_value(session, url, "gateway_requests_in_flight", 1, proxy)
            assert value(after, "gateway_requests_total", **OK) == 40
            before = counters(held)
            assert not [k for k, v in before.items() if counters(after).get(k, 0) < v]

            os.kill(proxy.process.pid, signal.SIGHUP)  # each worker reloads: 2 successes
            await until_value(session, url, "gateway_config_reloads_total", 2, proxy,
                              result="success")
            (tmp_path / "gateway.yaml").write_text("providers: 5\n")  # refused whole
            os.kill(proxy.process.pid, signal.SIGHUP)
            await until_value(session, url, "gateway_config_reloads_total", 2, proxy,
                              result="refused")
        [metrics_dir] = tmpdir.glob("proxy-metrics-*")
        assert {p.name.split("_")[0] for p in metrics_dir.iterdir()} >= {"counter"}
        assert await stop(proxy) == 0, proxy.output()
        assert not metrics_dir.exists(), "the metrics directory was left behind"
    finally:
        if slow is not None and not slow.done():
            slow.cancel()
        await stop(proxy)


async def test_two_gateways_on_one_host_never_share_figures(
    mock_upstream: MockUpstream, tmp_path: Path,
) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    ports = free_port(), free_port()
    gateways = [spawn_gateway(tmp_path, mock_upstream.url, port, tmpdir, f"gateway{i}")
                for i, port in enumerate(ports)]
    try:
        async with fresh_connections() as session:
            for proc, port, count in zip(gateways, ports, (3, 5), strict=True):
                url = f"http://127.0.0.1:{port}"
                await healthz_until(session, url, proc, lambda s: len(s) == 2)
                await chats(session, url, count)
            for proc, port, count in zip(gateways, ports, (3, 5), strict=True):
                await until_value(session, f"http://127.0.0.1:{port}",
                                  "gateway_requests_total", count, proc, **OK)
        assert len(list(tmpdir.glob("proxy-metrics-*"))) == 2
        for proc in gateways:
            assert await stop(proc) == 0, proc.output()
        assert not list(tmpdir.glob("proxy-metrics-*"))
    finally:
        for proc in gateways:
            await stop(proc)


async def test_a_request_forwarded_to_its_owner_worker_is_counted_once(
    mock_upstream: MockUpstream, tmp_path: Path,
) -> None:
    """Deterministic requests are shared across workers: the one that got the request
    forwards it to the worker owning its key (sharing/peers.py). Still one request each, one
    dedup leader and one upstream attempt, whichever worker did what."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proxy = spawn_gateway(tmp_path, mock_upstream.url, port, tmpdir, "gateway",
                          dedup="deterministic")
    try:
        async with fresh_connections() as session:
            await healthz_until(session, url, proxy, lambda s: len(s) == 2)
            await chats(session, url, 30, shared=True)
            samples = await until_value(session, url, "gateway_dedup_requests_total", 30,
                                        proxy, role="leader")
            assert value(samples, "gateway_requests_total", **OK) == 30
            assert value(samples, "gateway_upstream_attempts_total", outcome="success") == 30
            assert value(samples, "http_server_request_duration_seconds_count",
                         http_request_method="POST", http_route=CHAT,
                         http_response_status_code="200") == 30
    finally:
        await stop(proxy)
