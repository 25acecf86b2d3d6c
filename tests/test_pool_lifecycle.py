"""The worker's upstream pools (issue #2, "Streaming and the upstream client" and
"Parallel model discovery"):

* discovery and health never queue behind inference: with the inference pool saturated
  (``pool.limit: 1``, one chat held open, a second one waiting for the connection), a
  refreshed ``/v1/models`` and a freshly probed ``/health`` still answer at once;
* the inference pool resolves names with aiodns (``aiohttp.AsyncResolver``) and caches
  them: a second connection to the same host does not resolve it again;
* every upstream connection, idle inference and control alike, is closed when the
  gateway's app is cleaned up: the upstream sees them end.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any, ClassVar

import aiohttp
import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam
from yarl import URL

from proxy.server.serve import running
from proxy.upstream.client import UpstreamClient
from tests.conftest import MakeConfig, StartFake, StartGateway, StartUpstream
from tests.fake_upstream import CHAT as FAKE_CHAT
from tests.fake_upstream import Seen
from tests.polling import until
from tests.wire import ANSWER, CHAT, MODELS, Conn, RawUpstream, fetch, raw_servers, read_request

Client = Callable[..., openai.AsyncOpenAI]
USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


async def _get(url: str) -> tuple[int, dict[str, Any], float]:
    """Status, JSON body and seconds taken; bounded at 2 s."""
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session, \
            session.get(url) as response:
        return response.status, await response.json(), time.perf_counter() - started


def _chat_answer(model: str) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "done"}}]}


async def test_discovery_and_health_do_not_queue_behind_inference(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    entered, release = asyncio.Event(), asyncio.Event()
    upstream = await start_fake(("m1",), pieces=("done",), gate=release)

    async def arrived(request: web.Request, seen: Seen) -> None:
        if seen.path == FAKE_CHAT:
            entered.set()

    upstream.hook = arrived
    provider = upstream.provider("p", discover=True)
    config = make_config([provider], pool={"limit": 1}, models_cache_ttl=0.2,
                         health_cache_ttl=0, dedup={"mode": "off"}, cache={"enabled": False})
    gateway = await start_gateway(config)
    status, listed, _ = await _get(f"{gateway}/v1/models")
    assert (status, [m["id"] for m in listed["data"]]) == (200, ["m1"])

    client = openai_client(gateway)
    held = [asyncio.create_task(client.chat.completions.create(model="m1", messages=USER))
            for _ in range(2)]
    try:
        await asyncio.wait_for(entered.wait(), 2)
        upstream.model_ids.append("m2")
        await asyncio.sleep(0.3)  # past models_cache_ttl: the next listing refreshes
        deadline = time.perf_counter() + 1
        while True:  # stale-while-revalidate: the refreshed listing must show up soon
            status, listed, _ = await _get(f"{gateway}/v1/models")
            assert status == 200
            if [m["id"] for m in listed["data"]] == ["m1", "m2"]:
                break
            assert time.perf_counter() < deadline, "the refresh queued behind inference"
            await asyncio.sleep(0.02)
        status, health, elapsed = await _get(f"{gateway}/health")
        assert status == 200
        assert elapsed < 1, f"/health took {elapsed:.2f} s behind a saturated pool"
        assert [(p["status"], p["models"]) for p in health["providers"]] == [("healthy", 2)]
        assert upstream.chats == 1, "the pool was not saturated: the second chat went upstream"
    finally:
        release.set()
        answers = await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), 5)
    # An exception stays in the list as itself, so the assertion shows what failed.
    assert [a if isinstance(a, BaseException) else a.choices[0].message.content
            for a in answers] == ["done", "done"]
    assert [body["model"] for body in upstream.bodies()] == ["m1", "m1"]


class _RecordingResolver(aiohttp.AsyncResolver):
    """aiodns, answering IPv4 only (the upstream listens on 127.0.0.1); records hosts."""

    hosts: ClassVar[list[str]] = []

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> Any:
        self.hosts.append(host)
        return await super().resolve(host, port, socket.AF_INET)


async def test_inference_pool_resolves_with_aiodns_and_caches(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client, monkeypatch: pytest.MonkeyPatch,
) -> None:
    peers: list[int] = []

    async def list_models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    async def chat(request: web.Request) -> web.Response:
        """Keeps the client port and closes each connection (connection-level: its own
        app, not FakeUpstream)."""
        assert request.transport is not None  # None only once the connection is gone
        peers.append(request.transport.get_extra_info("peername")[1])
        response = web.json_response(_chat_answer("m"))
        response.force_close()  # the next request needs a new connection
        return response

    app = web.Application()
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat)
    port = (await start_upstream(app)).rsplit(":", 1)[1]
    monkeypatch.setattr(aiohttp, "AsyncResolver", _RecordingResolver)
    monkeypatch.setattr(_RecordingResolver, "hosts", [])
    provider = {"name": "p", "type": "openai_compat", "models": ["m"],
                "base_url": f"http://localhost:{port}/v1"}  # a name, not an address
    gateway = await start_gateway(make_config([provider]))
    await _get(f"{gateway}/v1/models")  # start-up discovery (the control session) is done
    _RecordingResolver.hosts.clear()
    client = openai_client(gateway)
    for _ in range(2):
        answer = await client.chat.completions.create(model="m", messages=USER)
        assert answer.choices[0].message.content == "done"
    assert len(set(peers)) == 2, "both chats used one connection: no new connect"
    assert _RecordingResolver.hosts == ["localhost"], (
        "the inference pool must resolve through aiodns once, then use its DNS cache")


async def _keep_alive(conn: Conn) -> None:
    """Answer every request, listings included, and keep the connection open."""
    while (request := await read_request(conn.reader)) is not None:
        conn.requests.append(request)
        await conn.send(MODELS if request.target.endswith("/models") else ANSWER)


async def test_upstream_connections_are_closed_at_shutdown(make_config: MakeConfig) -> None:
    async with raw_servers() as start:
        upstream: RawUpstream = await start(_keep_alive)
        provider = {"name": "p", "type": "openai_compat", "base_url": upstream.url,
                    "models": ["m"]}
        config = make_config([provider], server={"host": "127.0.0.1", "port": 0})
        async with running(config) as gateway:
            await until(lambda: len(upstream.connections) == 1, what="discovery's listing")
            status, _, body = await fetch(f"{gateway}/v1/chat/completions", body=CHAT)
            assert (status, body) == (200, ANSWER)
            assert len(upstream.inference) == 1
            await asyncio.sleep(0.05)  # time for a wrongly closed one to show as closed
            assert upstream.open == 2, "the idle control and inference connections"
        await until(lambda: upstream.open == 0, within=1, what=lambda: (
            f"{upstream.open} upstream connection(s) still open after the app's cleanup"))


async def test_a_closed_pool_refuses_with_a_connection_error_not_a_crash(
        make_config: MakeConfig) -> None:
    """A waiter woken as the pool closes at shutdown gets what maps to a 502."""
    client = UpstreamClient(make_config([]))
    await client.start()
    await client.close()
    with pytest.raises(aiohttp.ClientConnectionError, match="pool is closed"):
        await client._pool.acquire(client._pool.origin(URL("http://127.0.0.1:9/v1"), None))
