"""Response compression (issue 10) across processes: with ``--workers 2`` a request
forwarded to the worker that owns its key comes back gzip'ed once, never twice; and
``bench/compression.py`` runs as a user runs it."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson

from tests.conftest import StartFake
from tests.procs import free_port, poll_healthz, spawn_proxy, stop

REPO = Path(__file__).resolve().parent.parent
ANSWER = orjson.dumps({"id": "c1", "object": "chat.completion", "pad": "x" * 20_000})


async def test_two_workers_share_one_answer_and_each_client_gets_it_gzipped_once(
    start_fake: StartFake, tmp_path: Path,
) -> None:
    # 0.4 s: every request arrives while the first is in flight.
    upstream = await start_fake(body=ANSWER, latency=0.4)
    port = free_port()
    proxy = spawn_proxy(["--workers", "2", "--port", str(port),
                         "--upstream", upstream.url], tmp_path)
    body = orjson.dumps({"model": "m", "temperature": 0, "messages": []})
    headers = {"Content-Type": "application/json", "Accept-Encoding": "gzip"}
    try:
        async with aiohttp.ClientSession(  # a new connection per request: both workers
                connector=aiohttp.TCPConnector(force_close=True), auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=5)) as session:
            seen = await poll_healthz(session, f"http://127.0.0.1:{port}/healthz",
                                      lambda s: len(set(s.values())) == 2, [proxy])
            assert sorted(set(seen.values())) == [0, 1]

            async def post() -> tuple[int, str, bytes]:
                async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                        data=body, headers=headers) as response:
                    return (response.status, response.headers.get("Content-Encoding", ""),
                            await response.read())

            answers = await asyncio.gather(*(post() for _ in range(12)))
        assert [(status, coding) for status, coding, _ in answers] == [(200, "gzip")] * 12
        assert all(gzip.decompress(raw) == ANSWER for _, _, raw in answers)
        assert upstream.chats == 1, proxy.output()
    finally:
        assert await stop(proxy) == 0, proxy.output()


def test_the_benchmark_runs_and_shows_what_it_exists_to_show() -> None:
    """``bench/compression.py`` as a user runs it, with tiny bounds (its own 60 s
    ``--timeout`` stops it first; it starts nothing outside its own process)."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.compression", "--requests", "2", "--rounds", "1",
         "--timeout", "60", "--json"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, timeout=90, check=True)
    report = orjson.loads(done.stdout)
    ratios = {(r["case"], r["variant"]): r["ratio"] for r in report["results"]}
    assert ratios[("embeddings", "identity")] == ratios[("models", "identity")] == 1
    assert ratios[("embeddings", "gzip-1")] < 0.6
    assert ratios[("models", "gzip-1")] < 0.1
    assert {z["level"] for z in report["zlib"]} == {1, 3, 6}
