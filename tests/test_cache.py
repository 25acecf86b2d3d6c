"""The exact-match response cache, through the real gateway and as a unit.

Issue #3: "Exact-match, in memory: LRU with TTL and a byte budget. Only for deterministic
requests (``temperature`` 0, or a ``seed`` given) unless the client opts in with a header;
``Cache-Control: no-cache`` bypasses it. Streamed answers are cached too and replayed as
SSE. ``X-Cache: HIT|MISS``. Entries are never shared between callers of different
identity." Each upstream answer names its call number, so a body tells which call made it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest

from proxy.sharing.cache import ResponseCache
from tests.cache_helpers import CHAT, answer_id, chat, post, sse
from tests.conftest import MakeConfig, StartFake, StartGateway
from tests.fake_upstream import FakeUpstream


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


@pytest.fixture
def gateway(start_gateway: StartGateway, make_config: MakeConfig) -> Callable[..., Any]:
    """``await gateway(upstream, **raw_config)`` -> the chat completions URL."""
    async def start(upstream: FakeUpstream, **raw: Any) -> str:
        return await start_gateway(make_config([upstream.provider()], **raw)) + CHAT

    return start


@pytest.mark.parametrize("body", [chat(temperature=0), chat(seed=3, temperature=1)])
async def test_a_deterministic_answer_is_served_from_the_cache(
    gateway: Callable[..., Any], session: aiohttp.ClientSession, body: dict[str, Any],
    start_fake: StartFake,
) -> None:
    upstream = await start_fake()
    url = await gateway(upstream)
    first = await post(session, url, body, {"X-Request-ID": "first"})
    second = await post(session, url, body, {"X-Request-ID": "second"})
    assert upstream.chats == 1
    assert (first[0], second[0]) == (200, 200)
    assert (first[1]["X-Cache"], second[1]["X-Cache"]) == ("MISS", "HIT")
    assert first[2] == second[2]
    assert answer_id(second) == "answer-1"
    assert second[1]["Content-Type"].startswith("application/json")
    assert second[1]["X-Request-ID"] == "second"  # the hit's own id, not the first's


async def test_a_streamed_answer_is_cached_and_replayed_as_sse(
    gateway: Callable[..., Any], session: aiohttp.ClientSession,
    openai_client: Callable[..., openai.AsyncOpenAI],
    start_fake: StartFake,
) -> None:
    upstream = await start_fake()
    url = await gateway(upstream)
    body = chat(temperature=0, stream=True)
    first = await post(session, url, body)
    second = await post(session, url, body)
    expected = sse(1, "one") + sse(1, " two") + sse(1, " three") + b"data: [DONE]\n\n"
    assert (first[2], second[2]) == (expected, expected)
    assert (first[1]["X-Cache"], second[1]["X-Cache"]) == ("MISS", "HIT")
    assert second[1]["Content-Type"].startswith("text/event-stream")
    sdk = openai_client(url.removesuffix(CHAT))
    stream = await sdk.chat.completions.create(model="m", messages=body["messages"],
                                               temperature=0, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "one two three"
    assert upstream.chats == 1


@pytest.mark.parametrize(("headers", "cached"), [
    ({}, False), ({"X-Gateway-Cache": "on"}, True)])
async def test_sampled_requests_are_cached_only_on_request(
    gateway: Callable[..., Any], session: aiohttp.ClientSession, headers: dict[str, str],
    cached: bool,
    start_fake: StartFake,
) -> None:
    upstream = await start_fake()
    url = await gateway(upstream)
    replies = [await post(session, url, chat(temperature=0.7), headers) for _ in range(2)]
    if cached:
        assert [r[1]["X-Cache"] for r in replies] == ["MISS", "HIT"]
        assert upstream.chats == 1
    else:
        assert [r[1].get("X-Cache") for r in replies] == [None, None]
        assert upstream.chats == 2
        assert [answer_id(r) for r in replies] == ["answer-1", "answer-2"]


async def test_cache_control_no_cache_and_no_store(
    gateway: Callable[..., Any], session: aiohttp.ClientSession,
    start_fake: StartFake,
) -> None:
    upstream = await start_fake()
    url = await gateway(upstream)
    body = chat(temperature=0)

    async def ask(cache_control: str | None = None) -> tuple[str | None, str]:
        headers = {"Cache-Control": cache_control} if cache_control else {}
        reply = await post(session, url, body, headers)
        assert reply[0] == 200
        return reply[1].get("X-Cache"), answer_id(reply)

    assert await ask("no-store") == (None, "answer-1")  # neither read nor written
    assert await ask() == ("MISS", "answer-2")
    assert await ask("no-store") == (None, "answer-3")
    assert await ask() == ("HIT", "answer-2"), "no-store must not overwrite the entry"
    assert await ask("no-cache") == ("MISS", "answer-4")  # not read, but refreshed
    assert await ask() == ("HIT", "answer-4")
    assert await ask("max-age=0, No-Cache") == ("MISS", "answer-5")
    assert upstream.chats == 5


async def test_callers_never_share_an_entry(
    gateway: Callable[..., Any], session: aiohttp.ClientSession,
    start_fake: StartFake,
) -> None:
    upstream = await start_fake()
    url = await gateway(upstream)
    body = chat(temperature=0)
    a1 = await post(session, url, body, {"Authorization": "Bearer a"})
    b1 = await post(session, url, body, {"Authorization": "Bearer b"})
    a2 = await post(session, url, body, {"Authorization": "Bearer a"})
    assert [r[1]["X-Cache"] for r in (a1, b1, a2)] == ["MISS", "MISS", "HIT"]
    assert [answer_id(r) for r in (a1, b1, a2)] == ["answer-1", "answer-2", "answer-1"]
    assert upstream.chats == 2


async def test_an_entry_expires_after_its_ttl(
    gateway: Callable[..., Any], session: aiohttp.ClientSession,
    start_fake: StartFake,
) -> None:
    upstream = await start_fake()
    url = await gateway(upstream, cache={"ttl": 0.3})
    body = chat(temperature=0)
    assert (await post(session, url, body))[1]["X-Cache"] == "MISS"
    assert (await post(session, url, body))[1]["X-Cache"] == "HIT"
    await asyncio.sleep(0.4)
    again = await post(session, url, body)
    assert (again[1]["X-Cache"], answer_id(again)) == ("MISS", "answer-2")
    assert upstream.chats == 2


@pytest.mark.parametrize(("raw", "status", "pad"), [
    ({"cache": {"enabled": False}}, 200, 0),
    ({}, 500, 0),
    ({"cache": {"max_entry_bytes": 1000}}, 200, 2000),
], ids=["disabled", "error-answer", "entry-too-large"])
async def test_answers_that_are_never_cached(
    gateway: Callable[..., Any], session: aiohttp.ClientSession, raw: dict[str, Any],
    status: int, pad: int,
    start_fake: StartFake,
) -> None:
    upstream = await start_fake(status=status, pad=pad)
    url = await gateway(upstream, **raw)
    replies = [await post(session, url, chat(temperature=0)) for _ in range(2)]
    assert [r[0] for r in replies] == [status, status]
    assert upstream.chats == 2
    assert "HIT" not in [r[1].get("X-Cache") for r in replies]
    if status == 200:
        assert [answer_id(r) for r in replies] == ["answer-1", "answer-2"]
    if "enabled" in raw.get("cache", {}):
        assert [r[1].get("X-Cache") for r in replies] == [None, None]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def put(cache: ResponseCache, key: bytes, size: int) -> bool:
    return cache.put(key, 200, "OK", [("Content-Type", "application/json")], [b"x" * size])


def test_lru_eviction_under_the_byte_budget() -> None:
    # An entry's size counts body, headers and a fixed overhead: each of these is 328.
    cache = ResponseCache(max_bytes=1200, ttl=60, max_entry_bytes=600, clock=FakeClock())
    for key in (b"a", b"b", b"c"):
        assert put(cache, key, 100)
    assert (len(cache), cache.size) == (3, 984)
    assert cache.get(b"a") is not None  # a is now the most recently used
    assert put(cache, b"d", 100)  # over the budget: the least recently used goes first
    assert cache.get(b"b") is None
    assert [k for k in (b"a", b"c", b"d") if cache.get(k) is not None] == [b"a", b"c", b"d"]
    assert cache.size == 984
    assert not put(cache, b"big", 700), "larger than max_entry_bytes"
    assert cache.get(b"big") is None
    assert repr(cache) == (f"<ResponseCache entries=3 bytes=984/1200 "
                           f"hits={cache.hits} misses={cache.misses}>")


async def test_entries_expire_and_replay_what_was_stored() -> None:
    clock = FakeClock()
    cache = ResponseCache(max_bytes=10_000, ttl=5, max_entry_bytes=10_000, clock=clock)
    headers = [("Content-Type", "text/event-stream"), ("X-Request-ID", "leader"),
               ("X-Gateway-Dedup", "leader"), ("X-Custom", "kept")]
    assert cache.put(b"k", 200, "OK", headers, [b"data: 1\n\n", b"data: [DONE]\n\n"])
    clock.now += 4.9
    entry = cache.get(b"k")
    assert entry is not None
    answer = entry.replay()
    assert (answer.status, answer.event_stream) == (200, True)
    assert [await answer.body.next() for _ in range(3)] == [
        b"data: 1\n\n", b"data: [DONE]\n\n", None]
    # What described the original exchange is not replayed to another request.
    assert "X-Request-ID" not in answer.headers
    assert "X-Gateway-Dedup" not in answer.headers
    assert answer.headers["X-Custom"] == "kept"
    clock.now += 0.2
    assert cache.get(b"k") is None
    assert (len(cache), cache.size, cache.hits, cache.misses) == (0, 0, 1, 1)


async def test_accept_encoding_and_billing_headers_are_part_of_the_key(
    gateway: Callable[..., Any], session: aiohttp.ClientSession,
    start_fake: StartFake,
) -> None:
    """A gzip answer must never be replayed to a client that did not ask for gzip, and
    callers billing to another OpenAI organization or project never share an entry."""
    upstream = await start_fake()
    url = await gateway(upstream)
    body = chat(temperature=0)
    variants = [{"Accept-Encoding": "identity"}, {"Accept-Encoding": "gzip"},
                {"Accept-Encoding": "identity", "OpenAI-Organization": "org-b"},
                {"Accept-Encoding": "identity", "OpenAI-Project": "proj-b"}]
    firsts = [await post(session, url, body, headers) for headers in variants]
    again = [await post(session, url, body, headers) for headers in variants]
    assert [r[1]["X-Cache"] for r in firsts] == ["MISS"] * 4
    assert [answer_id(r) for r in again] == [answer_id(r) for r in firsts]
    assert [r[1]["X-Cache"] for r in again] == ["HIT"] * 4
    assert upstream.chats == 4
