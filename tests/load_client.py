"""Bounded client load for tests/test_load_bounds.py: aiohttp sessions (the openai SDK
would be the bottleneck at 10,000+ requests), and raw sockets left idle.

Every outcome is a string: ``ok``, or what went wrong (``status 503``, an exception's
name, ``truncated``), counted in a ``Counter`` the test compares with ``{"ok": N}``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import aiohttp
import orjson

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello"}]
JSON_BODY = orjson.dumps({"model": "mock-gpt", "messages": MESSAGES})
STREAM_BODY = orjson.dumps({"model": "mock-gpt", "stream": True, "messages": MESSAGES})
# An abandoned stream would run 5 s upstream (100 chunks 50 ms apart) if not cancelled.
LONG_STREAM = {"X-Mock-Chunks": "100", "X-Mock-Interval": "0.05"}
JSON_HEADERS = {"Content-Type": "application/json"}
Kind = str  # "json" | "stream" | "abandon"


async def one(session: aiohttp.ClientSession, url: str, kind: Kind) -> str:
    """One request of ``kind``, checked: a whole answer, or (``abandon``) one chunk of a
    stream the client then drops, closing its connection mid-stream."""
    body = JSON_BODY if kind == "json" else STREAM_BODY
    headers = {**JSON_HEADERS, **LONG_STREAM} if kind == "abandon" else JSON_HEADERS
    try:
        async with session.post(url + CHAT, data=body, headers=headers) as response:
            if response.status != 200:
                return f"status {response.status}"
            if kind == "abandon":
                first = await response.content.readany()
                response.close()
                return "ok" if first.startswith(b"data: {") else "no first chunk"
            raw = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__
    if kind == "stream":
        return "ok" if raw.endswith(b"data: [DONE]\n\n") else "truncated"
    content = orjson.loads(raw)["choices"][0]["message"]["content"]
    return "ok" if content.endswith("hello") else "wrong answer"


async def hammer(url: str, clients: int, per_client: int,
                 kind_of: Callable[[int], Kind] = lambda _: "json",
                 within: float = 150.0) -> Counter[str]:
    """``clients`` concurrent clients, each sending ``per_client`` requests in turn over
    one session whose connector allows ``clients`` connections; request ``n`` (counted
    over all clients) is of kind ``kind_of(n)``. Bounded by ``within`` seconds."""
    outcomes: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def client(index: int) -> None:
            for n in range(per_client):
                outcomes[await one(session, url, kind_of(index * per_client + n))] += 1

        async with asyncio.timeout(within):
            await asyncio.gather(*(client(i) for i in range(clients)))
    return outcomes


async def open_idle(port: int, count: int, into: list[asyncio.StreamWriter],
                    request: bytes | None = None, batch: int = 100) -> None:
    """``count`` connections to ``port`` left open and idle, added to ``into`` as they
    open (the caller closes them): silent ones (``request`` None), or ones that first
    sent ``request`` and read its whole answer (keep-alive idle). Opened ``batch`` at a
    time, so the listen backlog never overflows."""
    async def open_one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        into.append(writer)
        if request is not None:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            assert head.startswith(b"HTTP/1.1 200"), head

    async with asyncio.timeout(60):
        for start in range(0, count, batch):
            await asyncio.gather(*(open_one() for _ in range(min(batch, count - start))))
