"""In-flight deduplication through the real gateway, against tiny upstreams that count.

Issue #3: "Identical requests that are in flight at the same time share one upstream
call. [...] An upstream error is delivered to every waiter. [...] A subscriber that joins
late first receives the chunks already sent, then the live rest [...] a slow client must
not stall the others [...] when the last one leaves, the upstream call is cancelled."
Each upstream answer names its call number, so identical bodies prove one shared call.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from proxy.errors import FellBehind
from proxy.sharing.dedup import Exchange, Head, InflightRequests
from tests.conftest import MakeConfig, StartGateway, StartLive, StartUpstream
from tests.fake_upstream import FakeUpstream

CHAT = "/v1/chat/completions"
Reply = tuple[int, "dict[str, str]", bytes]  # status, headers, body


def upstream(delay: float = 0.2, events: int = 6, interval: float = 0.15, pad: int = 0,
             **reply: Any) -> FakeUpstream:
    """The counting fake (tests/fake_upstream.py) as these tests script it, not yet
    started: JSON answers after ``delay``; a stream of ``events`` events ``w0 ``, ``w1 ``
    ... ``interval`` apart, each padded with ``pad`` bytes."""
    return FakeUpstream(("m", "e"), latency=delay, interval=interval, pad=pad,
                        pieces=tuple(f"w{i} " for i in range(events)), **reply)


def event(call: int, index: int, pad: int = 0) -> bytes:
    """The fake's event ``index`` of call ``call``, written out: a shared stream must be
    these exact bytes."""
    chunk = {"id": f"chatcmpl-{call}", "object": "chat.completion.chunk", "created": 1,
             "model": "m", **({"pad": "x" * pad} if pad else {}),
             "choices": [{"index": 0, "delta": {"content": f"w{index} "},
                          "finish_reason": None}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def full_stream(call: int, events: int = 6, pad: int = 0) -> bytes:
    return b"".join(event(call, i, pad) for i in range(events)) + b"data: [DONE]\n\n"


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


@pytest.fixture
def gateway(start_upstream: StartUpstream, start_gateway: StartGateway,
            make_config: MakeConfig) -> Callable[..., Any]:
    """``await gateway(upstream, **raw_config)`` -> the gateway's base URL. The cache is
    off unless ``raw_config`` says otherwise, so only deduplication can share."""
    async def start(upstream: FakeUpstream, **raw: Any) -> str:
        upstream.url = f"{await start_upstream(upstream.app())}/v1"
        raw.setdefault("cache", {"enabled": False})
        return await start_gateway(make_config([upstream.provider()], **raw))

    return start


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any] | bytes,
               headers: dict[str, str] | None = None) -> Reply:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    async with session.post(url, data=data, headers=all_headers) as response:
        return response.status, dict(response.headers), await response.read()


async def burst(session: aiohttp.ClientSession, url: str, body: dict[str, Any], n: int,
                headers: dict[str, str] | None = None) -> list[Reply]:
    return await asyncio.gather(*(post(session, url, body, headers) for _ in range(n)))


def roles(replies: Sequence[Reply]) -> list[str | None]:
    return sorted((r[1].get("X-Gateway-Dedup") for r in replies), key=str)


@pytest.mark.parametrize(("path", "body"), [
    (CHAT, chat(temperature=0)),
    (CHAT, chat(seed=7)),
    (CHAT, chat(seed=7, temperature=0.7)),
    ("/v1/embeddings", {"model": "e", "input": "hello"}),
])
async def test_identical_deterministic_requests_share_one_call(
    gateway: Callable[..., Any], session: aiohttp.ClientSession, path: str,
    body: dict[str, Any],
) -> None:
    fake = upstream()
    url = await gateway(fake) + path
    replies = await asyncio.gather(*(
        post(session, url, body, {"X-Request-ID": f"client-{i}"}) for i in range(20)))
    assert fake.calls[path] == 1
    assert {r[0] for r in replies} == {200}
    assert len({r[2] for r in replies}) == 1  # and from call 1: X-Upstream-Request-ID
    assert roles(replies) == ["follower"] * 19 + ["leader"]
    # Each client gets its own request id back, not the leader's.
    assert [r[1]["X-Request-ID"] for r in replies] == [f"client-{i}" for i in range(20)]
    assert {r[1].get("X-Upstream-Request-ID") for r in replies} == {"upstream-1"}


@pytest.mark.parametrize(("raw", "body", "headers", "shared"), [
    ({}, chat(temperature=0.7), {}, False),
    ({"dedup": {"mode": "all"}}, chat(temperature=0.7), {}, True),
    ({"dedup": {"mode": "all"}}, chat(), {}, True),
    ({"dedup": {"mode": "off"}}, chat(temperature=0), {}, False),
    ({}, chat(temperature=0), {"X-Gateway-Dedup": "off"}, False),
], ids=["sampled", "mode-all", "mode-all-no-temperature", "mode-off", "header-off"])
async def test_dedup_modes_and_opt_out(
    gateway: Callable[..., Any], session: aiohttp.ClientSession, raw: dict[str, Any],
    body: dict[str, Any], headers: dict[str, str], shared: bool,
) -> None:
    fake = upstream()
    replies = await burst(session, await gateway(fake, **raw) + CHAT, body, 5, headers)
    assert {r[0] for r in replies} == {200}
    if shared:
        assert fake.chats == 1
        assert roles(replies) == ["follower"] * 4 + ["leader"]
    else:
        assert fake.chats == 5
        assert roles(replies) == [None] * 5
        assert len({r[2] for r in replies}) == 5  # five independent answers


async def test_callers_and_bodies_that_differ(
    gateway: Callable[..., Any], session: aiohttp.ClientSession,
) -> None:
    fake = upstream()
    url = await gateway(fake) + CHAT
    body = chat(temperature=0)
    a, b = await asyncio.gather(post(session, url, body, {"Authorization": "Bearer a"}),
                                post(session, url, body, {"Authorization": "Bearer b"}))
    assert fake.chats == 2, "two callers must never share an answer"
    assert (a[1]["X-Gateway-Dedup"], b[1]["X-Gateway-Dedup"]) == ("leader", "leader")
    reordered = b'{"temperature": 0, "messages": [{"content": "hi", "role": "user"}], ' \
                b'"model": "m"}'
    replies = await asyncio.gather(post(session, url, body), post(session, url, reordered))
    assert fake.chats == 3, "the same body with keys reordered is the same request"
    assert replies[0][2] == replies[1][2]
    await asyncio.gather(post(session, url, body),
                         post(session, url, chat(temperature=0, max_tokens=5)))
    assert fake.chats == 5


@pytest.mark.parametrize(("status", "headers"), [(500, {}), (429, {"Retry-After": "7"})])
async def test_upstream_error_reaches_every_waiter(
    gateway: Callable[..., Any], session: aiohttp.ClientSession, status: int,
    headers: dict[str, str],
) -> None:
    fake = upstream(status=status, headers=headers)
    replies = await burst(session, await gateway(fake) + CHAT, chat(temperature=0), 6)
    assert fake.chats == 1
    assert {r[0] for r in replies} == {status}
    assert {orjson.loads(r[2])["error"]["message"] for r in replies} == {"failure 1"}
    assert {r[1].get("Retry-After") for r in replies} == {headers.get("Retry-After")}
    assert roles(replies) == ["follower"] * 5 + ["leader"]


async def read_timed(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                     pause: float = 0.0) -> tuple[list[tuple[float, bytes]], dict[str, str]]:
    """Stream ``body``; sleep ``pause`` s after the headers; (arrival time, bytes) list."""
    arrivals: list[tuple[float, bytes]] = []
    # The same credentials as the SDK's, so they are one caller and may share; one
    # Accept-Encoding for every client, since it is part of the key.
    auth = {"Authorization": "Bearer sk-client-test", "Accept-Encoding": "identity"}
    async with session.post(url, json=body, headers=auth) as response:
        assert response.status == 200
        await asyncio.sleep(pause)
        async for data in response.content.iter_any():
            arrivals.append((time.monotonic(), data))
        return arrivals, dict(response.headers)


def joined(arrivals: list[tuple[float, bytes]]) -> bytes:
    return b"".join(data for _, data in arrivals)


async def test_stream_fans_out_to_late_subscribers(
    gateway: Callable[..., Any], session: aiohttp.ClientSession,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    fake = upstream()
    base = await gateway(fake)
    body = chat(temperature=0, stream=True)
    # Built now: building it blocks the loop for a while. Its Accept-Encoding is the
    # other clients' (part of the key).
    sdk = openai_client(base, default_headers={"Accept-Encoding": "identity"})
    gc.collect()  # now, so that no full collection (100 ms and more) lands in the window

    async def after_two_events() -> None:
        """Join between the 2nd and 3rd events (150 ms apart), however late the first
        request started on a busy machine."""
        for _ in range(400):
            if len(fake.written_at) >= 2:
                return
            await asyncio.sleep(0.005)

    async def late_sdk() -> str:
        await after_two_events()
        stream = await sdk.chat.completions.create(
            model="m", messages=body["messages"], temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async def late_raw() -> tuple[float, list[tuple[float, bytes]], dict[str, str]]:
        await after_two_events()
        joined_at = time.monotonic()
        return joined_at, *await read_timed(session, base + CHAT, body)

    first, (b_joined, b_arrivals, b_headers), text = await asyncio.gather(
        read_timed(session, base + CHAT, body), late_raw(), late_sdk())
    assert fake.chats == 1
    assert joined(first[0]) == full_stream(1)
    assert joined(b_arrivals) == full_stream(1)
    assert text == "".join(f"w{i} " for i in range(6))
    assert (first[1]["X-Gateway-Dedup"], b_headers["X-Gateway-Dedup"]) == ("leader", "follower")
    # B joined after two events had gone out and got them before the third was written.
    assert fake.written_at[1] < b_joined < fake.written_at[2]
    assert received_by(b_arrivals, len(event(1, 0) + event(1, 1))) < fake.written_at[2]


def received_by(arrivals: list[tuple[float, bytes]], size: int) -> float:
    """When the first ``size`` bytes had arrived."""
    seen = 0
    for at, data in arrivals:
        seen += len(data)
        if seen >= size:
            return at
    raise AssertionError(f"only {seen} bytes arrived")


async def test_slow_subscriber_does_not_stall_the_others(
    gateway: Callable[..., Any], session: aiohttp.ClientSession,
) -> None:
    # 6 events of 512 KiB: far more than the socket and client buffers of a client that
    # does not read, so a gateway writing to subscribers in lockstep would stall A.
    fake = upstream(interval=0.1, pad=512 * 1024)
    url = await gateway(fake) + CHAT
    body = chat(temperature=0, stream=True)
    started = time.monotonic()
    fast, slow = await asyncio.gather(read_timed(session, url, body),
                                      read_timed(session, url, body, pause=1.0))
    expected = full_stream(1, pad=512 * 1024)
    assert joined(fast[0]) == expected
    assert joined(slow[0]) == expected
    assert fake.chats == 1
    fast_done = fast[0][-1][0]
    assert fast_done < started + 1.0 <= slow[0][0][0], "the fast client waited for the slow"


async def test_leader_leaving_does_not_cancel_the_shared_call(
    live_gateway: StartLive, session: aiohttp.ClientSession,
) -> None:
    fake = upstream(delay=0.4)
    gateway = await live_gateway(fake, cache={"enabled": False})
    url = gateway.url + CHAT
    body = chat(temperature=0)
    leader = asyncio.create_task(post(session, url, body))
    await gateway.until(lambda: fake.chats == 1, what="the leader's call")
    followers = asyncio.gather(post(session, url, body), post(session, url, body))
    await gateway.until(lambda: gateway.inflight.followed == 2, what="two followers")
    leader.cancel()  # closes the leader's connection
    replies = await followers
    assert [r[0] for r in replies] == [200, 200]
    assert len({r[2] for r in replies}) == 1
    assert orjson.loads(replies[0][2])["id"] == "answer-1"
    assert roles(replies) == ["follower", "follower"]
    assert fake.chats == 1
    assert fake.cancelled == 0


async def test_last_waiter_leaving_cancels_the_upstream_call(
    live_gateway: StartLive, session: aiohttp.ClientSession,
) -> None:
    fake = upstream(delay=5)
    gateway = await live_gateway(fake, cache={"enabled": False})
    url = gateway.url + CHAT
    clients = [asyncio.create_task(post(session, url, chat(temperature=0))) for _ in range(3)]
    await gateway.until(lambda: fake.chats == 1 and gateway.inflight.followed == 2,
                        what="one call, the other two joined")
    for client in clients:
        client.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    await gateway.until(lambda: fake.cancelled == 1, 1.0, "the upstream call cancelled")
    assert fake.chats == 1


async def test_a_subscriber_that_falls_too_far_behind_is_cut_off() -> None:
    """Unit test of the exchange's buffer budget: the producer is not held back, a subscriber
    more than ``max_buffer_bytes`` behind gets ``FellBehind``, the others go on, and
    chunks everybody has read are dropped."""
    exchange = Exchange(b"key", max_buffer_bytes=1000)
    reader, idle = exchange.subscribe(), exchange.subscribe()
    exchange.set_head(Head(200, "OK", (("Content-Type", "text/event-stream"),), False))
    reading = (await reader.answer()).body
    stalled = (await idle.answer()).body
    sent = [bytes([65 + i % 26]) * 100 for i in range(30)]
    got: list[bytes] = []
    for chunk in sent:
        exchange.append(chunk)
        chunk_read = await reading.next()
        assert chunk_read is not None
        got.append(chunk_read)
    assert exchange.total_bytes == 3000
    assert exchange.chunks == [], "chunks everybody read must be dropped"
    assert exchange._buffered <= 1000  # what the exchange still holds
    assert not exchange.joinable, "a late joiner could no longer get the whole answer"
    exchange.finish()
    assert await reading.next() is None
    assert got == sent
    with pytest.raises(FellBehind):
        await stalled.next()


async def test_a_client_that_never_reads_is_cut_off_the_others_finish(
    live_gateway: StartLive, session: aiohttp.ClientSession,
) -> None:
    # 4 MB streamed at full speed against a 256 KiB budget: the client that reads keeps
    # well within it; the one that never reads fills its socket buffers and falls behind.
    fake = upstream(events=2000, interval=0, pad=2000)
    fake.chat.gate = gate = asyncio.Event()
    gateway = await live_gateway(fake, cache={"enabled": False},
                                 dedup={"max_buffer_bytes": 256 * 1024})
    base = gateway.url
    body = orjson.dumps(chat(temperature=0, stream=True))
    host, port = base.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stuck.setblocking(False)
    with stuck:
        await loop.sock_connect(stuck, (host, int(port)))
        await loop.sock_sendall(stuck, (
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer sk-client-test\r\nAccept-Encoding: identity\r\n"
            f"Connection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        await gateway.until(lambda: fake.chats == 1, what="the stuck client's call")
        reader = asyncio.create_task(read_timed(session, base + CHAT, orjson.loads(body), 0))
        await gateway.until(lambda: gateway.inflight.followed == 1, what="the reader joined")
        gate.set()
        arrivals, headers = await asyncio.wait_for(reader, 5)
        assert joined(arrivals) == full_stream(1, events=2000, pad=2000)
        assert headers["X-Gateway-Dedup"] == "follower"
        received = b""
        while chunk := await asyncio.wait_for(loop.sock_recv(stuck, 65536), 5):
            received += chunk
    assert fake.chats == 1
    assert b"client_too_slow" in received
    assert b"[DONE]" not in received


@pytest.mark.parametrize(("stream", "pause"), [(False, 0), (True, 0), (True, 0.3)],
                         ids=["json", "stream", "stream-read-late"])
async def test_a_lone_client_is_never_cut_off(
    gateway: Callable[..., Any], session: aiohttp.ClientSession, stream: bool, pause: float,
) -> None:
    """The budget bounds how far a subscriber may lag behind another one; a client alone
    on its exchange lags behind nobody, whether its answer is larger than the budget or
    it reads slower than the upstream writes (the exchange then waits for it)."""
    fake = upstream(delay=0, interval=0, events=200, pad=20_000)
    url = await gateway(fake, dedup={"max_buffer_bytes": 2048}) + CHAT
    if not stream:
        status, _, body = await post(session, url, chat(temperature=0))
        assert (status, orjson.loads(body)["pad"]) == (200, "x" * 20_000)
        return
    arrivals, _ = await read_timed(session, url, chat(temperature=0, stream=True), pause)
    assert joined(arrivals) == full_stream(1, events=200, pad=20_000)


async def test_a_cancelled_exchange_takes_no_new_followers() -> None:
    """Once the last waiter left, the call is being cancelled: a request arriving before
    the task has run its cancellation must start its own call, not join a doomed one."""
    inflight = InflightRequests(1024)
    exchange = inflight.lead(b"key")
    exchange.task = asyncio.create_task(asyncio.sleep(10))
    subscription = exchange.subscribe()
    assert inflight.join(b"key") is exchange
    exchange.leave(subscription)
    try:
        assert exchange.task.cancelling()
        assert inflight.join(b"key") is None
        assert inflight.lead(b"key") is not exchange
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await exchange.task
