"""First, do no harm (issue 9, "Done when"): with its default configuration the gateway
serves every request a plain proxy would have served, under mixed, realistic traffic
rather than a counting upstream that answers at once.

The gateway runs as a real process in drop-in mode (``proxy serve --upstream``, nothing
else configured) in front of the mock upstream (``python -m proxy.mock``) in a process of its
own. The traffic: short answers first (a latency baseline), then one burst of hundreds
of concurrent requests mixing 50 ms answers, multi-second generations, streams, gzip
request bodies and a few request-specific 500s, from several callers. The upstream
never pushes back, so nothing may be refused or cut: every answer must be the
upstream's own, whole, and no protective mechanism (breaker, adaptive limit, queue) may
answer in its place.
"""

from __future__ import annotations

import asyncio
import gzip
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson

from tests.procs import Proc, free_port, mock_upstream_process, nofile_raised, started

CHAT = "/v1/chat/completions"
BURST = 400


def request_for(n: int) -> tuple[str, dict[str, str], bytes]:
    """Request ``n`` of the burst: (kind, headers, body). One in ten is a 500 the
    upstream gives for this request's content alone; callers take turns."""
    kind = ("short", "long", "stream", "gzip", "short", "long", "stream", "short",
            "long", "error")[n % 10]
    headers = {"Content-Type": "application/json",
               "Authorization": f"Bearer sk-caller-{n % 4}"}
    payload: dict[str, object] = {"model": "mock-gpt",
                                  "messages": [{"role": "user", "content": f"hello {n}"}]}
    if kind in ("short", "gzip"):
        headers["X-Mock-Latency"] = "0.05"
    elif kind == "long":
        headers["X-Mock-Latency"] = "3"
    elif kind == "stream":
        payload["stream"] = True
        headers.update({"X-Mock-Chunks": "20", "X-Mock-Interval": "0.1"})
    else:
        headers["X-Mock-Status"] = "500"
    body = orjson.dumps(payload)
    if kind == "gzip":
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    return kind, headers, body


async def outcome(session: aiohttp.ClientSession, url: str, n: int) -> str:
    kind, headers, body = request_for(n)
    try:
        async with session.post(url + CHAT, data=body, headers=headers) as response:
            raw = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"{kind}: {type(exc).__name__}"
    if kind == "error":
        upstream_500 = status == 500 and b"scripted failure" in raw
        return f"{kind}: ok" if upstream_500 else f"{kind}: {status} {raw[:120]!r}"
    if status != 200:
        return f"{kind}: {status} {raw[:120]!r}"
    if kind == "stream":
        whole = raw.endswith(b"data: [DONE]\n\n") and raw.count(b"data: {") >= 20
        return f"{kind}: ok" if whole else f"{kind}: truncated"
    return f"{kind}: ok" if orjson.loads(raw)["choices"] else f"{kind}: empty"


@asynccontextmanager
async def dropin_gateway(tmp_path: Path, upstream: Proc) -> AsyncIterator[Proc]:
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "serve", "--upstream", upstream.url,
            "--port", str(port)]
    async with started("gateway", argv, port, "/healthz", tmp_path) as proc:
        yield proc


async def test_default_gateway_serves_a_mixed_burst_like_a_plain_proxy(
    tmp_path: Path,
) -> None:
    with nofile_raised(4 * BURST):
        async with mock_upstream_process(tmp_path) as upstream, \
                dropin_gateway(tmp_path, upstream) as gateway:
            connector = aiohttp.TCPConnector(limit=BURST)
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(connector=connector,
                                             timeout=timeout) as session:
                # A baseline of short answers, 50 at a time, from every caller.
                async with asyncio.timeout(60):
                    for start in range(0, 200, 50):
                        warm = await asyncio.gather(*(
                            outcome(session, gateway.url, 10 * n) for n in range(start,
                                                                                 start + 50)))
                        assert Counter(warm) == {"short: ok": 50}, gateway.output()
                    # Then the burst: hundreds at once, most of them long.
                    burst = await asyncio.gather(*(
                        outcome(session, gateway.url, n) for n in range(BURST)))
            expected = Counter(request_for(n)[0] + ": ok" for n in range(BURST))
            assert dict(Counter(burst)) == dict(expected), gateway.output()[-3000:]
            output = gateway.output()
            assert "Traceback" not in output, output
