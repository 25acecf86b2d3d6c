"""Edges the review of issue 10 found: usage of a gzip'ed answer, usage rows that a
client-chosen model name must not create, ``/v1/usage`` never proxied for another
method, the tries of a route whose every deployment fails, secrets in a base_url, and
requests the HTTP parser refuses (they never reach the middlewares) observed too."""

from __future__ import annotations

import asyncio
import gzip

import aiohttp
import orjson
from aiohttp import web

from proxy.observe.logs import redacted
from tests.conftest import MakeConfig, StartUpstream
from tests.observing import CHAT, answering, observed, provider, until

USAGE = {"prompt_tokens": 1234, "completion_tokens": 567, "total_tokens": 1801}


async def test_the_usage_of_a_gzipped_answer_is_read(
    start_upstream: StartUpstream, make_config: MakeConfig,
) -> None:
    """SDKs send Accept-Encoding: gzip, which goes upstream: a provider that compresses
    must not leave every answer's usage an estimate."""
    async def chat(request: web.Request) -> web.Response:
        assert "gzip" in request.headers.get("Accept-Encoding", "")
        body = gzip.compress(orjson.dumps({"id": "x", "object": "chat.completion",
                                           "choices": [], "usage": USAGE}))
        return web.Response(body=body, content_type="application/json",
                            headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    url = await start_upstream(app)
    config = make_config([provider("up", url)], cache={"enabled": False})
    async with observed(config) as (gateway, seen), aiohttp.ClientSession() as session:
        async with session.post(f"{gateway}/v1/chat/completions", json=CHAT,
                                headers={"Accept-Encoding": "gzip"}) as response:
            assert (await response.json())["usage"] == USAGE
        await until(seen, 1)
    usage = seen[0].usage
    assert usage is not None and usage.source == "reported"
    assert (usage.input, usage.output) == (1234, 567)


async def test_client_chosen_model_names_do_not_become_usage_rows(
    start_upstream: StartUpstream, make_config: MakeConfig,
) -> None:
    url = await start_upstream(answering({"id": "x", "object": "chat.completion",
                                           "choices": [], "usage": USAGE}))
    config = make_config([provider("up", url)], cache={"enabled": False},
                         dedup={"mode": "off"})
    async with observed(config) as (gateway, seen), aiohttp.ClientSession() as session:
        for n in range(20):  # a provider/ prefix routes any name
            body = {**CHAT, "model": f"up/made-up-{n}-" + "x" * 2000}
            async with session.post(f"{gateway}/v1/chat/completions", json=body) as r:
                assert r.status == 200
        async with session.post(f"{gateway}/v1/chat/completions", json=CHAT) as r:
            assert r.status == 200
        await until(seen, 21)
        async with session.get(f"{gateway}/v1/usage") as response:
            rows = (await response.json())["data"]
        async with session.post(f"{gateway}/v1/usage", json=CHAT) as response:
            assert response.status == 405
            assert (await response.json())["error"]["code"] == "method_not_allowed"
    assert {(row["model"], row["requests"]) for row in rows} == {("other", 20), ("m", 1)}


async def test_a_route_whose_every_deployment_fails_counts_every_try(
    make_config: MakeConfig, closed_port: int,
) -> None:
    dead = f"http://127.0.0.1:{closed_port}"
    config = make_config([provider("a", dead), provider("b", dead)],
                         deployments={"m": ["a", "b"]}, cache={"enabled": False})
    async with observed(config) as (gateway, seen), aiohttp.ClientSession() as session:
        async with session.post(f"{gateway}/v1/chat/completions", json=CHAT) as response:
            assert response.status == 502
        await until(seen, 1)
    origin = seen[0].origin
    assert origin is not None and origin.attempts == 2


def test_secrets_in_a_base_url_are_redacted() -> None:
    assert redacted("https://sk-live-abc123@api.example.com/v1") == \
        "https://***@api.example.com/v1"
    assert redacted("https://api.example.com/v1?key=SEKRIT&v=2") == \
        "https://api.example.com/v1?key=***&v=***"
    assert redacted("http://127.0.0.1:8080/v1") == "http://127.0.0.1:8080/v1"


async def test_requests_the_parser_refuses_are_observed(
    start_upstream: StartUpstream, make_config: MakeConfig,
) -> None:
    url = await start_upstream(web.Application())
    async with observed(make_config([provider("up", url)])) as (gateway, seen):
        host, port = gateway.removeprefix("http://").split(":")
        statuses = []
        for head in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000,
                     b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: gzip, chunked\r\n"):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head + b"\r\n\r\n")
            status = (await asyncio.wait_for(reader.readline(), 5)).split()[1]
            writer.close()
            statuses.append(int(status))
        await until(seen, 2)
    assert [(r.status, r.path) for r in seen] == [(s, "other") for s in statuses]
    assert statuses[0] == 431 and all(r.error_code for r in seen), seen
