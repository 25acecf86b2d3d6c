"""Graceful lifecycle (issue #4): SIGTERM stops accepting, lets in-flight streams finish
for up to ``server.shutdown_grace`` seconds, then closes what is left; exit status 0.
The gateway runs as a real process (``python -m proxy serve``)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartFake
from tests.fake_upstream import DONE, FakeUpstream, sse
from tests.procs import free_port, poll_healthz, spawn_proxy, stop

CHAT = "/v1/chat/completions"
STREAMS = 50


def slow_stream(fake: FakeUpstream, events: int, interval: float) -> FakeUpstream:
    """``fake`` streams ``events`` chunks ``{"n": 0}``, ``{"n": 1}``, ... ``interval`` s
    apart, then ``[DONE]``."""
    fake.chat.events = (*(sse({"n": n}) for n in range(events)), DONE)
    fake.chat.interval = interval
    return fake


async def read_stream(session: aiohttp.ClientSession, url: str,
                      first: asyncio.Event) -> bytes:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    received = b""
    try:
        async with session.post(url, json=body) as response:
            async for chunk in response.content.iter_any():
                received += chunk
                first.set()
    except aiohttp.ClientError:
        pass  # a cut stream: what arrived is what counts
    return received


async def streams_under_sigterm(start_fake: StartFake, tmp_path: Path, *,
                                events: int, grace: float) -> tuple[list[bytes], int | None,
                                                                    float]:
    upstream = slow_stream(await start_fake(), events, 0.1)
    port = free_port()
    (tmp_path / "proxy.yaml").write_text(f"server: {{shutdown_grace: {grace}}}\n")
    proxy = spawn_proxy(["--config", str(tmp_path / "proxy.yaml"), "--port", str(port),
                         "--upstream", upstream.url], tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=20)) as session:
            await poll_healthz(session, f"{base}/healthz", bool, [proxy])
            firsts = [asyncio.Event() for _ in range(STREAMS)]
            readers = [asyncio.create_task(read_stream(session, base + CHAT, e))
                       for e in firsts]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 10)
            assert upstream.chats == STREAMS
            sent = time.monotonic()
            proxy.process.send_signal(signal.SIGTERM)
            bodies = await asyncio.wait_for(asyncio.gather(*readers), 20)
            # Waited for, not signalled again: a second SIGTERM would cut the grace short.
            code = await asyncio.to_thread(proxy.process.wait, grace + 10)
            return bodies, code, time.monotonic() - sent
    finally:
        await stop(proxy)


@pytest.mark.timeout(60)
async def test_sigterm_lets_open_streams_finish(start_fake: StartFake,
                                                tmp_path: Path) -> None:
    bodies, code, _ = await streams_under_sigterm(start_fake, tmp_path,
                                                  events=10, grace=10)
    assert code == 0
    complete = [b for b in bodies if b.endswith(b"data: [DONE]\n\n") and b'"n":9' in b]
    assert len(complete) == STREAMS, [b[-40:] for b in bodies if b not in complete][:3]


@pytest.mark.timeout(60)
async def test_streams_longer_than_the_grace_are_cut_and_the_worker_exits(
        start_fake: StartFake, tmp_path: Path) -> None:
    bodies, code, elapsed = await streams_under_sigterm(start_fake, tmp_path,
                                                        events=100, grace=0.5)
    assert code == 0
    assert elapsed < 6, f"exit took {elapsed:.1f} s with a 0.5 s grace"
    assert not [b for b in bodies if b.endswith(b"data: [DONE]\n\n")]
