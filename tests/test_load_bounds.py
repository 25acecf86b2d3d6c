"""The gateway process under load (issue #4, "Fault tests"): idle connections do not
starve a request, 10,000 requests from 500 concurrent clients get no errors, and memory
and file descriptors stay bounded over 20,000 requests with streams and abandoned
streams in the mix.

Three processes on loopback: the gateway (``python -m proxy serve``), the mock upstream
(``python -m proxy.mock``, instant answers) and the test, the client. The figures
are printed (``pytest -s``); the bounds are generous for a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.memory import fd_count, rss_mb, socket_inodes, tcp_inodes
from tests.load_client import hammer, one, open_idle
from tests.procs import Proc, gateway_process, mock_upstream_process, nofile_raised, soft_nofile

IDLE = 1000  # idle connections of each kind
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"
CLIENTS, PER_CLIENT = 500, 20
WARM_UP, MEASURED = 2_000, 20_000
RSS_GROWTH_MB, FD_GROWTH = 20.0, 10


@pytest.fixture
async def upstream(tmp_path: Path) -> AsyncIterator[Proc]:
    async with mock_upstream_process(tmp_path) as proc:
        yield proc


def config(upstream: Proc, **raw: Any) -> dict[str, Any]:
    """Every request reaches the upstream (no cache)."""
    return {"providers": [{"name": "mock", "type": "openai_compat", "base_url": upstream.url}],
            "cache": {"enabled": False}, **raw}


def client_connections(gateway: Proc) -> int:
    """Connections the gateway process holds from clients (accepted, established)."""
    return len(socket_inodes(gateway.pid) & tcp_inodes(gateway.port, local=True))


def upstream_connections(gateway: Proc, upstream: Proc) -> int:
    return len(socket_inodes(gateway.pid) & tcp_inodes(upstream.port, local=False))


async def timed_request(url: str) -> tuple[str, float]:
    """One chat request on a new connection, and how long it took."""
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        outcome = await one(session, url, "json")
    return outcome, time.monotonic() - started


async def test_idle_connections_do_not_delay_a_request(upstream: Proc,
                                                       tmp_path: Path) -> None:
    with nofile_raised(4 * IDLE + 512) as limit:
        async with gateway_process(tmp_path, config(upstream)) as gateway:
            assert soft_nofile(gateway.pid) == limit  # inherited by the gateway
            idle: list[asyncio.StreamWriter] = []
            try:
                await open_idle(gateway.port, IDLE, idle)  # silent from the start
                await open_idle(gateway.port, IDLE, idle, request=HEALTHZ)  # kept alive
                for _ in range(100):  # the gateway accepted them all (polled, <= 5 s)
                    if (held := client_connections(gateway)) >= 2 * IDLE:
                        break
                    await asyncio.sleep(0.05)
                assert held >= 2 * IDLE, f"the gateway holds {held} client connections"
                timings = [await timed_request(gateway.url) for _ in range(5)]
                print(f"with {held} idle connections held: "
                      + ", ".join(f"{t * 1000:.0f} ms" for _, t in timings))
                assert [outcome for outcome, _ in timings] == ["ok"] * 5
                assert max(t for _, t in timings) < 1.0
                assert client_connections(gateway) >= 2 * IDLE  # none dropped to make room
            finally:
                for writer in idle:
                    writer.close()


@pytest.mark.timeout(180)
async def test_500_concurrent_clients_10000_requests_no_errors(upstream: Proc,
                                                               tmp_path: Path) -> None:
    # The default limits: 64 in flight at first, the others queue (up to 1024, 2 s).
    with nofile_raised(4 * CLIENTS + 512):
        async with gateway_process(tmp_path, config(upstream)) as gateway:
            started = time.monotonic()
            outcomes = await hammer(gateway.url, CLIENTS, PER_CLIENT)
            elapsed = time.monotonic() - started
    total = CLIENTS * PER_CLIENT
    print(f"{CLIENTS} clients x {PER_CLIENT}: {dict(outcomes)} in {elapsed:.1f} s "
          f"({total / elapsed:.0f} req/s)")
    assert outcomes == Counter(ok=total)


def mix(n: int) -> str:
    """Of every 10 requests: 7 JSON, 2 streams read to the end, 1 stream abandoned."""
    return "abandon" if n % 10 == 9 else "stream" if n % 10 >= 7 else "json"


async def idle_figures(gateway: Proc, upstream: Proc) -> dict[str, float]:
    """RSS (MB) and fds once the gateway holds no client connection and, its pool
    keep-alive being short, no upstream one (polled, at most 10 s): so two snapshots
    count the same things, and an upstream read a dropped client left running shows."""
    for _ in range(200):
        if not client_connections(gateway) and not upstream_connections(gateway, upstream):
            break
        await asyncio.sleep(0.05)
    return {"rss_mb": rss_mb(gateway.pid), "fds": fd_count(gateway.pid),
            "client_conns": client_connections(gateway),
            "upstream_conns": upstream_connections(gateway, upstream)}


@pytest.mark.timeout(180)
async def test_memory_and_fds_stay_bounded_over_20000_requests(upstream: Proc,
                                                               tmp_path: Path) -> None:
    clients = 50
    raw = {"pool": {"keepalive_timeout": 0.5}}
    async with gateway_process(tmp_path, config(upstream, **raw)) as gateway:
        started = time.monotonic()
        warm = await hammer(gateway.url, clients, WARM_UP // clients, mix)
        before = await idle_figures(gateway, upstream)
        load = await hammer(gateway.url, clients, MEASURED // clients, mix)
        after = await idle_figures(gateway, upstream)
        elapsed = time.monotonic() - started
    print(f"after {WARM_UP:,} warm-up requests: {before}\n"
          f"after {MEASURED:,} more: {after}\n"
          f"RSS growth {after['rss_mb'] - before['rss_mb']:+.1f} MB, fds "
          f"{after['fds'] - before['fds']:+.0f}; {elapsed:.1f} s in all")
    assert warm == Counter(ok=WARM_UP)
    assert load == Counter(ok=MEASURED)
    assert after["rss_mb"] - before["rss_mb"] < RSS_GROWTH_MB
    assert after["fds"] <= before["fds"] + FD_GROWTH
    assert after["upstream_conns"] == 0  # no abandoned stream's upstream read outlived it
