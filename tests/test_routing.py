"""Routing rules through the real gateway (issue #2, "Routing and providers").

Each provider is a tiny upstream app defined here that records what it received and
answers a chat completion naming itself and echoing the model it was sent, so every test
can tell which upstream got a request and under which name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from yarl import URL

from tests.conftest import MakeConfig, StartGateway, StartUpstream

USER = [{"role": "user", "content": "hi"}]


@dataclass
class Received:
    method: str
    raw_path: str  # path and query exactly as they came over the wire
    body: bytes

    @property
    def model(self) -> str | None:
        payload = orjson.loads(self.body) if self.body else {}
        return payload.get("model") if isinstance(payload, dict) else None


@dataclass
class Fake:
    """One fake provider: its ``/v1/models`` list, and what it was sent."""

    name: str
    models: list[str] = field(default_factory=list)
    models_status: int = 200
    received: list[Received] = field(default_factory=list)
    models_calls: int = 0
    url: str = ""  # base URL including /v1, set once started

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._list)
        app.router.add_route("*", "/v1/{tail:.*}", self._any)
        return app

    async def _list(self, request: web.Request) -> web.Response:
        self.models_calls += 1
        if self.models_status != 200:
            return web.json_response({"error": {"message": "down"}}, status=self.models_status)
        data = [{"id": m, "object": "model", "created": 1, "owned_by": "x"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _any(self, request: web.Request) -> web.Response:
        received = Received(request.method, request.raw_path, await request.read())
        self.received.append(received)
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
            "model": received.model or "",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.name}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    @property
    def models_sent(self) -> list[str | None]:
        """The ``model`` of each request it received, in order."""
        return [received.model for received in self.received]

    def provider(self, **extra: Any) -> dict[str, Any]:
        return {"name": self.name, "type": "openai_compat", "base_url": self.url, **extra}


async def _start(start_upstream: StartUpstream, *fakes: Fake) -> None:
    for fake in fakes:
        fake.url = f"{await start_upstream(fake.app())}/v1"


async def _chat(client: openai.AsyncOpenAI, model: str) -> tuple[str, str]:
    """(the upstream that answered, the model name it received)."""
    answer = await client.chat.completions.create(model=model, messages=USER)
    return answer.choices[0].message.content or "", answer.model


Client = Callable[..., openai.AsyncOpenAI]


async def test_prefix_routes_and_is_stripped(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a, b = Fake("a", ["gpt"]), Fake("b", ["llama"])
    await _start(start_upstream, a, b)
    client = openai_client(await start_gateway(make_config([a.provider(), b.provider()])))
    assert await _chat(client, "b/llama") == ("b", "llama")
    assert await _chat(client, "a/llama") == ("a", "llama")
    assert [r.model for r in b.received] == ["llama"]
    assert orjson.loads(b.received[0].body)["messages"] == USER


async def test_unchanged_model_forwards_the_exact_bytes(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a = Fake("a", ["gpt"])
    await _start(start_upstream, a)
    gateway = await start_gateway(make_config([a.provider()]))
    body = b'{ "messages" :[ {"content":"hi",   "role":"user"} ],\n\t"model" : "gpt" ,"n":1 }'
    async with aiohttp.ClientSession() as session, session.post(
            f"{gateway}/v1/chat/completions", data=body,
            headers={"Content-Type": "application/json"}) as response:
        assert response.status == 200
    assert [r.body for r in a.received] == [body]
    assert a.received[0].raw_path == "/v1/chat/completions"


async def test_renamed_model_keeps_the_rest_of_the_body(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a = Fake("a", ["gpt"])
    await _start(start_upstream, a)
    gateway = await start_gateway(make_config([a.provider()]))
    sent = {"temperature": 0.25, "messages": USER, "model": "a/gpt", "extra": {"k": [1, 2]}}
    async with aiohttp.ClientSession() as session, session.post(
            f"{gateway}/v1/chat/completions", json=sent) as response:
        assert response.status == 200
    assert orjson.loads(a.received[0].body) == {**sent, "model": "gpt"}


async def test_aliases_route_and_rename(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a, b = Fake("a", []), Fake("b", ["llama"])
    await _start(start_upstream, a, b)
    config = make_config([a.provider(models=["gpt-static"]), b.provider()],
                         aliases={"fast": "b/llama", "smart": "gpt-static"})
    client = openai_client(await start_gateway(config))
    assert await _chat(client, "fast") == ("b", "llama")
    assert await _chat(client, "smart") == ("a", "gpt-static")
    assert [r.model for r in a.received] == ["gpt-static"]
    assert [r.model for r in b.received] == ["llama"]


async def test_static_models_route_without_discovery(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a = Fake("a", [], models_status=500)
    b = Fake("b", ["other"])
    await _start(start_upstream, a, b)
    config = make_config([a.provider(models=["static-one", "static-two"]), b.provider()])
    client = openai_client(await start_gateway(config))
    assert await _chat(client, "static-two") == ("a", "static-two")
    assert await _chat(client, "other") == ("b", "other")
    listed = {m.id: m.owned_by for m in (await client.models.list()).data}
    assert listed == {"static-one": "a", "static-two": "a", "other": "b"}


async def test_discovered_models_first_provider_wins(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a, b = Fake("a", ["shared", "only-a"]), Fake("b", ["shared", "only-b"])
    await _start(start_upstream, a, b)
    client = openai_client(await start_gateway(make_config([a.provider(), b.provider()])))
    assert await _chat(client, "shared") == ("a", "shared")
    assert await _chat(client, "only-b") == ("b", "only-b")
    assert await _chat(client, "only-a") == ("a", "only-a")
    assert await _chat(client, "b/shared") == ("b", "shared")


@pytest.mark.parametrize("static", [True, False], ids=["static", "discovered"])
async def test_model_ids_with_slashes(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client, static: bool,
) -> None:
    model = "meta-llama/llama-3.1-8b-instruct"
    local, router = Fake("local", ["llama3"]), Fake("openrouter", [] if static else [model])
    await _start(start_upstream, local, router)
    extra = {"models": [model]} if static else {}
    config = make_config([local.provider(), router.provider(**extra)])
    client = openai_client(await start_gateway(config))
    assert await _chat(client, model) == ("openrouter", model)
    assert await _chat(client, f"openrouter/{model}") == ("openrouter", model)
    assert [r.model for r in router.received] == [model, model]
    assert local.received == []
    listed = {m.id: m.owned_by for m in (await client.models.list()).data}
    assert listed[model] == "openrouter"


async def test_unknown_model_is_404_model_not_found(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a = Fake("a", ["gpt"])
    await _start(start_upstream, a)
    config = make_config([a.provider()], aliases={"fast": "a/gpt"})
    client = openai_client(await start_gateway(config))
    with pytest.raises(openai.NotFoundError) as caught:
        await _chat(client, "no-such-model")
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert "no-such-model" in caught.value.message
    assert a.url not in caught.value.message
    assert a.received == []


async def test_models_list_ids_as_clients_send_them(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a, b = Fake("a", ["shared", "only-a"]), Fake("b", ["shared", "only-b"])
    c = Fake("c", [], models_status=500)
    await _start(start_upstream, a, b, c)
    config = make_config([a.provider(), b.provider(), c.provider(models=["static-c"])],
                         aliases={"fast": "b/only-b", "cheap": "static-c"})
    client = openai_client(await start_gateway(config))
    listed = {m.id: m.owned_by for m in (await client.models.list()).data}
    assert listed == {"shared": "a", "only-a": "a", "b/shared": "b", "only-b": "b",
                      "static-c": "c", "fast": "b", "cheap": "c"}
    for model_id, owner in listed.items():
        answered_by, _ = await _chat(client, model_id)
        assert answered_by == owner, model_id
    assert [r.model for r in b.received] == ["shared", "only-b", "only-b"]
    assert [r.model for r in c.received] == ["static-c", "static-c"]


async def test_other_paths_go_to_the_models_provider(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a, b = Fake("a", ["gpt"]), Fake("b", ["tts-1"])
    await _start(start_upstream, a, b)
    gateway = await start_gateway(make_config([a.provider(), b.provider()]))
    async with aiohttp.ClientSession() as session, session.post(
            f"{gateway}/v1/audio/speech?format=mp3&speed=1.5",
            json={"model": "tts-1", "input": "hi"}) as response:
        assert response.status == 200
    assert [(r.method, r.raw_path, r.model) for r in b.received] == [
        ("POST", "/v1/audio/speech?format=mp3&speed=1.5", "tts-1")]
    assert a.received == []


async def test_modelless_request_goes_to_the_single_provider(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a = Fake("a", ["gpt"])
    await _start(start_upstream, a)
    gateway = await start_gateway(make_config([a.provider()]))
    async with aiohttp.ClientSession() as session, session.get(
            f"{gateway}/v1/files?purpose=batch&limit=2") as response:
        assert response.status == 200
    assert [(r.method, r.raw_path, r.body) for r in a.received] == [
        ("GET", "/v1/files?purpose=batch&limit=2", b"")]


@pytest.mark.parametrize("path", [
    "/v1/files?purpose=a%26b%20c&after=x%2Fy",  # decoded, one parameter would become two
    "/v1/files/file%20x%2Fy/content",  # decoded, the path would gain a segment
])
async def test_percent_escapes_are_forwarded_as_sent(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    path: str,
) -> None:
    a = Fake("a", ["gpt"])
    await _start(start_upstream, a)
    gateway = await start_gateway(make_config([a.provider()]))
    async with aiohttp.ClientSession() as session, session.get(
            URL(f"{gateway}{path}", encoded=True)) as response:
        assert response.status == 200
    assert [(r.method, r.raw_path) for r in a.received] == [("GET", path)]
