"""Routing rules through the real gateway (issue #2, "Routing and providers").

Each provider is a tiny upstream app defined here that records what it received and
answers a chat completion naming itself and echoing the model it was sent, so every test
can tell which upstream got a request and under which name.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import openai
import orjson
import pytest
from yarl import URL

from tests.conftest import MakeConfig, StartGateway, StartUpstream
from tests.routing_helpers import USER, Fake, chat_with, start_fakes

Client = Callable[..., openai.AsyncOpenAI]


async def test_prefix_routes_and_is_stripped(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a, b = Fake("a", ["gpt"]), Fake("b", ["llama"])
    await start_fakes(start_upstream, a, b)
    client = openai_client(await start_gateway(make_config([a.provider(), b.provider()])))
    assert await chat_with(client, "b/llama") == ("b", "llama")
    assert await chat_with(client, "a/llama") == ("a", "llama")
    assert [r.model for r in b.received] == ["llama"]
    assert orjson.loads(b.received[0].body)["messages"] == USER


async def test_unchanged_model_forwards_the_exact_bytes(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a = Fake("a", ["gpt"])
    await start_fakes(start_upstream, a)
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
    await start_fakes(start_upstream, a)
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
    await start_fakes(start_upstream, a, b)
    config = make_config([a.provider(models=["gpt-static"]), b.provider()],
                         aliases={"fast": "b/llama", "smart": "gpt-static"})
    client = openai_client(await start_gateway(config))
    assert await chat_with(client, "fast") == ("b", "llama")
    assert await chat_with(client, "smart") == ("a", "gpt-static")
    assert [r.model for r in a.received] == ["gpt-static"]
    assert [r.model for r in b.received] == ["llama"]


async def test_static_models_route_without_discovery(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a = Fake("a", [], models_status=500)
    b = Fake("b", ["other"])
    await start_fakes(start_upstream, a, b)
    config = make_config([a.provider(models=["static-one", "static-two"]), b.provider()])
    client = openai_client(await start_gateway(config))
    assert await chat_with(client, "static-two") == ("a", "static-two")
    assert await chat_with(client, "other") == ("b", "other")
    listed = {m.id: m.owned_by for m in (await client.models.list()).data}
    assert listed == {"static-one": "a", "static-two": "a", "other": "b"}


async def test_discovered_models_first_provider_wins(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a, b = Fake("a", ["shared", "only-a"]), Fake("b", ["shared", "only-b"])
    await start_fakes(start_upstream, a, b)
    client = openai_client(await start_gateway(make_config([a.provider(), b.provider()])))
    assert await chat_with(client, "shared") == ("a", "shared")
    assert await chat_with(client, "only-b") == ("b", "only-b")
    assert await chat_with(client, "only-a") == ("a", "only-a")
    assert await chat_with(client, "b/shared") == ("b", "shared")


@pytest.mark.parametrize("static", [True, False], ids=["static", "discovered"])
async def test_model_ids_with_slashes(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client, static: bool,
) -> None:
    model = "meta-llama/llama-3.1-8b-instruct"
    local, router = Fake("local", ["llama3"]), Fake("openrouter", [] if static else [model])
    await start_fakes(start_upstream, local, router)
    extra = {"models": [model]} if static else {}
    config = make_config([local.provider(), router.provider(**extra)])
    client = openai_client(await start_gateway(config))
    assert await chat_with(client, model) == ("openrouter", model)
    assert await chat_with(client, f"openrouter/{model}") == ("openrouter", model)
    assert [r.model for r in router.received] == [model, model]
    assert local.received == []
    listed = {m.id: m.owned_by for m in (await client.models.list()).data}
    assert listed[model] == "openrouter"


async def test_unknown_model_is_404_model_not_found(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a = Fake("a", ["gpt"])
    await start_fakes(start_upstream, a)
    config = make_config([a.provider()], aliases={"fast": "a/gpt"})
    client = openai_client(await start_gateway(config))
    with pytest.raises(openai.NotFoundError) as caught:
        await chat_with(client, "no-such-model")
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
    await start_fakes(start_upstream, a, b, c)
    config = make_config([a.provider(), b.provider(), c.provider(models=["static-c"])],
                         aliases={"fast": "b/only-b", "cheap": "static-c"})
    client = openai_client(await start_gateway(config))
    listed = {m.id: m.owned_by for m in (await client.models.list()).data}
    assert listed == {"shared": "a", "only-a": "a", "b/shared": "b", "only-b": "b",
                      "static-c": "c", "fast": "b", "cheap": "c"}
    for model_id, owner in listed.items():
        answered_by, _ = await chat_with(client, model_id)
        assert answered_by == owner, model_id
    assert [r.model for r in b.received] == ["shared", "only-b", "only-b"]
    assert [r.model for r in c.received] == ["static-c", "static-c"]


async def test_other_paths_go_to_the_models_provider(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a, b = Fake("a", ["gpt"]), Fake("b", ["tts-1"])
    await start_fakes(start_upstream, a, b)
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
    await start_fakes(start_upstream, a)
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
    await start_fakes(start_upstream, a)
    gateway = await start_gateway(make_config([a.provider()]))
    async with aiohttp.ClientSession() as session, session.get(
            URL(f"{gateway}{path}", encoded=True)) as response:
        assert response.status == 200
    assert [(r.method, r.raw_path) for r in a.received] == [("GET", path)]
