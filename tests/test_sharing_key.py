"""The key under which requests share an upstream call (dedup) or a cached answer.

Issue #3: "The key covers everything that changes the answer: the caller's identity [...],
provider, path, and the request body canonicalised". Two requests that differ only in
the provider they are routed to, in their path, or in their query string must never share;
identical ones must. Each upstream answer names its provider, call number and the path
and query it was asked for, so a shared answer shows in the body as well as in the count.

The provider cannot be varied with ``provider/model`` names: the body would differ too
and hide a key without the provider. Instead two discovering providers serve the same
model name, and the catalog is refreshed (``GET /health`` with ``health_cache_ttl: 0``)
after the first one starts serving it, which moves the identical request to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import StartLive, StartUpstream
from tests.polling import until
from tests.running import RunningGateway

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi",
        "temperature": 0}
Reply = tuple[int, "dict[str, str]", bytes]
# Only one way of sharing at a time, so each test shows that one's key.
DEDUP_ONLY = {"cache": {"enabled": False}}
CACHE_ONLY = {"dedup": {"mode": "off"}}


class Upstream:
    """Lists ``models``; answers chat and completions after ``delay`` s, naming itself."""

    def __init__(self, name: str, models: tuple[str, ...] = ("m",), delay: float = 0.2):
        self.name, self.models, self.delay = name, models, delay
        self.calls: list[str] = []  # path and query of each inference call

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post(CHAT, self.answer)
        app.router.add_post(COMPLETIONS, self.answer)
        return app

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list",
                                  "data": [{"id": m, "object": "model"} for m in self.models]})

    async def answer(self, request: web.Request) -> web.Response:
        await request.read()
        self.calls.append(request.path_qs)
        answer_id = f"{self.name}-{len(self.calls)}"
        await asyncio.sleep(self.delay)
        return web.json_response({"id": answer_id, "asked": request.path_qs})


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client:
        yield client


@pytest.fixture
def gateway(start_upstream: StartUpstream, live_gateway: StartLive) -> Callable[..., Any]:
    """``await gateway([upstream, ...], static=..., **raw)`` -> the live gateway (its
    in-flight map in reach). With ``static`` each provider lists its models in the
    config, else they are discovered."""
    async def start(upstreams: list[Upstream], static: bool = True,
                    **raw: Any) -> RunningGateway:
        providers = []
        for upstream in upstreams:
            url = await start_upstream(upstream.app())
            providers.append({"name": upstream.name, "type": "openai_compat",
                              "base_url": f"{url}/v1",
                              **({"models": list(upstream.models)} if static else {})})
        return await live_gateway(*providers, **raw)

    return start


async def post(session: aiohttp.ClientSession, url: str,
               body: dict[str, Any] = BODY) -> Reply:
    async with session.post(url, data=orjson.dumps(body),
                            headers={"Content-Type": "application/json"}) as response:
        return response.status, dict(response.headers), await response.read()


def answer(reply: Reply) -> tuple[str, str]:
    """(answer id, the path and query the upstream was asked), of a 200 reply."""
    assert reply[0] == 200, reply
    body = orjson.loads(reply[2])
    return body["id"], body["asked"]


async def serve_model_from(session: aiohttp.ClientSession, base: str, upstream: Upstream
                           ) -> None:
    """``upstream`` starts serving ``m``; refresh the gateway's catalog now."""
    upstream.models = ("m",)
    async with session.get(base + "/health") as response:
        assert response.status == 200
        body = await response.json()
    assert {p["name"]: p["models"] for p in body["providers"]}[upstream.name] == 1


async def test_requests_routed_to_another_provider_never_join_its_call(
    gateway: Callable[..., Any], session: aiohttp.ClientSession,
) -> None:
    first, second = Upstream("first", models=(), delay=0), Upstream("second", delay=0.6)
    live = await gateway([first, second], static=False, health_cache_ttl=0, **DEDUP_ONLY)
    base, url = live.url, live.url + CHAT
    in_flight = [asyncio.create_task(post(session, url))]
    try:
        await until(lambda: bool(second.calls))
        in_flight.append(asyncio.create_task(post(session, url)))  # identical: joins
        await live.until(lambda: live.inflight.followed == 1, what="the second one joining")
        await serve_model_from(session, base, first)  # "m" now routes to "first"
        to_first = await post(session, url)
        assert not any(task.done() for task in in_flight), "the call to 'second' ended"
        replies = [*await asyncio.wait_for(asyncio.gather(*in_flight), 5), to_first]
    finally:
        for task in in_flight:
            task.cancel()
    assert [answer(r)[0] for r in replies] == ["second-1", "second-1", "first-1"]
    assert [r[1]["X-Gateway-Dedup"] for r in replies] == ["leader", "follower", "leader"]
    assert (len(first.calls), len(second.calls)) == (1, 1)


async def test_a_cached_answer_is_never_replayed_for_another_provider(
    gateway: Callable[..., Any], session: aiohttp.ClientSession,
) -> None:
    first, second = Upstream("first", models=(), delay=0), Upstream("second", delay=0)
    base = (await gateway([first, second], static=False, health_cache_ttl=0, **CACHE_ONLY)).url
    url = base + CHAT
    replies = [await post(session, url), await post(session, url)]
    await serve_model_from(session, base, first)
    replies += [await post(session, url), await post(session, url)]
    assert [answer(r)[0] for r in replies] == ["second-1", "second-1", "first-1", "first-1"]
    assert [r[1]["X-Cache"] for r in replies] == ["MISS", "HIT", "MISS", "HIT"]
    assert (len(first.calls), len(second.calls)) == (1, 1)


VARIANTS = {
    "path": [CHAT, COMPLETIONS],
    "query": [CHAT, f"{CHAT}?api-version=1", f"{CHAT}?api-version=2"],
}


@pytest.mark.parametrize("differs", VARIANTS)
async def test_in_flight_requests_differing_in_path_or_query_never_share(
    gateway: Callable[..., Any], session: aiohttp.ClientSession, differs: str,
) -> None:
    """Every variant twice at once: the identical pair shares one call, no two variants do."""
    upstream = Upstream("up")
    base = (await gateway([upstream], **DEDUP_ONLY)).url
    paths = VARIANTS[differs]
    replies = await asyncio.gather(*(post(session, base + path)
                                     for path in paths for _ in range(2)))
    assert sorted(upstream.calls) == sorted(paths)
    for index, path in enumerate(paths):
        pair = replies[2 * index:2 * index + 2]
        assert [answer(r)[1] for r in pair] == [path, path]
        assert answer(pair[0])[0] == answer(pair[1])[0]
        assert sorted(r[1]["X-Gateway-Dedup"] for r in pair) == ["follower", "leader"]


@pytest.mark.parametrize("differs", VARIANTS)
async def test_cached_answers_are_kept_apart_by_path_and_query(
    gateway: Callable[..., Any], session: aiohttp.ClientSession, differs: str,
) -> None:
    upstream = Upstream("up", delay=0)
    base = (await gateway([upstream], **CACHE_ONLY)).url
    paths = VARIANTS[differs]
    firsts = [await post(session, base + path) for path in paths]
    again = [await post(session, base + path) for path in paths]
    assert [answer(r)[1] for r in firsts] == paths
    assert [r[1]["X-Cache"] for r in firsts] == ["MISS"] * len(paths)
    assert [answer(r) for r in again] == [answer(r) for r in firsts]
    assert [r[1]["X-Cache"] for r in again] == ["HIT"] * len(paths)
    assert upstream.calls == paths
