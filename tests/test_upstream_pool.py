"""The one shared, limited upstream pool per worker, and the compiled pieces of the hot
path (issue #3: "stay the one shared, limited pool per worker"; "aiohttp's C extensions
in use (a test asserts the C HTTP parser is active)")."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import time

import aiohttp
import aiohttp.client_proto
import aiohttp.http_parser
import aiohttp.web_protocol
import uvloop
from multidict import CIMultiDict
from yarl import URL

from proxy.cli import main as cli
from proxy.upstream import protocol as http1
from proxy.upstream.client import UpstreamClient
from proxy.upstream.protocol import UpstreamRequest
from tests.conftest import MakeConfig, StartGateway
from tests.polling import until
from tests.wire import ANSWER, CHAT, Conn, RawUpstream, StartRaw, answer_each, fetch

HOLD = 0.3


async def held(conn: Conn) -> None:
    """Keep-alive, each answer held back ``HOLD`` s."""
    async for _ in conn:
        await asyncio.sleep(HOLD)
        await conn.send(ANSWER)


async def post(client: UpstreamClient, upstream: RawUpstream) -> tuple[int, bytes]:
    request = UpstreamRequest("POST", URL(f"{upstream.url}/chat/completions"),
                              CIMultiDict({"Content-Type": "application/json"}), b"{}")
    async with client.open(request, "prov") as response:
        return response.status, await response.content.read()


async def test_pool_limit_bounds_open_upstream_connections(
        raw_upstream: StartRaw, make_config: MakeConfig) -> None:
    upstream = await raw_upstream(held)
    client = UpstreamClient(make_config([], pool={"limit": 2}))
    await client.start()
    try:
        started = time.perf_counter()
        answers = await asyncio.wait_for(
            asyncio.gather(*(post(client, upstream) for _ in range(4))), 5)
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    assert answers == [(200, ANSWER)] * 4
    assert upstream.max_open == 2
    assert [len(c.requests) for c in upstream.connections] == [2, 2]  # kept alive, reused
    assert elapsed >= 2 * HOLD * 0.9  # two waves of two


async def test_kept_connections_follow_the_adaptive_limit(
        raw_upstream: StartRaw, make_config: MakeConfig) -> None:
    """Issue #3: the shared pool's per-host limit follows the adaptive one. Three answers
    at once leave three keep-alive connections; once the provider's limit drops to 1,
    the pool keeps one and closes the others, now or as they come back."""
    upstream = await raw_upstream(held)
    client = UpstreamClient(make_config([]))
    await client.start()
    try:
        follow = client.limit_follower(URL(upstream.url), None, "prov", 64)
        follow.claim()
        await asyncio.wait_for(asyncio.gather(*(post(client, upstream) for _ in range(3))), 5)
        assert upstream.open == 3
        follow(1)
        await until(lambda: upstream.open == 1, within=1,
                    what="the connections over the new limit closed")
        assert "open=1 idle=1" in repr(client)
        follow(4)  # grows again: new connections are kept up to the new limit
        await asyncio.wait_for(asyncio.gather(*(post(client, upstream) for _ in range(3))), 5)
        assert upstream.open == 3
    finally:
        await client.close()


async def test_a_replaced_limiter_no_longer_sets_the_origins_cap(
        raw_upstream: StartRaw, make_config: MakeConfig) -> None:
    """A reload builds a new limiter for a changed provider: the pool follows it from its
    initial limit on, and the old one (still releasing requests) is ignored."""
    upstream = await raw_upstream(held)
    client = UpstreamClient(make_config([]))
    await client.start()
    try:
        url = URL(upstream.url)
        old = client.limit_follower(url, None, "prov", 64)
        old.claim()
        old(4)  # learnt low before the reload
        origin = client._pool.origin(url, None)
        assert origin.cap == 4
        new = client.limit_follower(url, None, "prov", 64)  # the new limiter, built
        assert origin.cap == 4  # ... but not in force yet: nothing changes
        new.claim()
        assert origin.cap == 64
        old(2)
        assert origin.cap == 64
        moved = client.limit_follower(URL("http://127.0.0.2:9/v1"), None, "prov", 16)
        moved.claim()
        assert (origin.caps, origin.cap) == ({}, 0)  # base_url changed: the cap left it
        moved(8)
        assert client._pool.origin(URL("http://127.0.0.2:9/v1"), None).cap == 8
        client._pool.forget("prov")  # a reload removed the provider
        assert client._pool.origin(URL("http://127.0.0.2:9/v1"), None).cap == 0
    finally:
        await client.close()


async def test_repr_tells_limit_state_and_in_flight(
        raw_upstream: StartRaw, make_config: MakeConfig) -> None:
    upstream = await raw_upstream(held)
    client = UpstreamClient(make_config([], pool={"limit": 7}))
    assert "closed" in repr(client)
    assert "pool_limit=7" in repr(client)
    await client.start()
    try:
        task = asyncio.create_task(post(client, upstream))
        await until(lambda: client.in_flight, within=0.5, what="the request on its way")
        assert "open" in repr(client)
        assert "in_flight=1" in repr(client)
        assert await asyncio.wait_for(task, 3) == (200, ANSWER)
        assert "in_flight=0" in repr(client)
    finally:
        await client.close()
    assert "closed" in repr(client)


async def test_providers_on_one_origin_share_the_pool(
        raw_upstream: StartRaw, start_gateway: StartGateway, make_config: MakeConfig) -> None:
    upstream = await raw_upstream(answer_each)
    providers = [{"name": name, "type": "openai_compat", "base_url": upstream.url,
                  "models": [f"m-{name}"]} for name in ("a", "b")]
    url = await start_gateway(make_config(providers))
    for name in ("a", "b", "a", "b"):
        status, _, body = await fetch(f"{url}/v1/chat/completions",
                                      body={**CHAT, "model": f"m-{name}"})
        assert (status, body) == (200, ANSWER)
    assert [len(c.requests) for c in upstream.inference] == [4]


def test_aiohttp_c_http_parsers_are_active() -> None:
    compiled = importlib.import_module("aiohttp._http_parser")  # fails when not built
    assert "AIOHTTP_NO_EXTENSIONS" not in os.environ
    assert aiohttp.http_parser.HttpResponseParser is compiled.HttpResponseParser
    assert aiohttp.http_parser.HttpRequestParser is compiled.HttpRequestParser
    # the very names the upstream reader and the gateway's server use
    assert vars(http1)["HttpResponseParser"] is compiled.HttpResponseParser
    assert vars(aiohttp.client_proto)["HttpResponseParser"] is compiled.HttpResponseParser
    assert vars(aiohttp.web_protocol)["HttpRequestParser"] is compiled.HttpRequestParser


def test_cli_serves_on_uvloop() -> None:
    assert vars(cli)["uvloop"] is uvloop
    assert "uvloop.run(serve(" in inspect.getsource(cli)
