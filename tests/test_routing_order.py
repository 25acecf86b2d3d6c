"""The routing order when several rules claim one model name (issue #2, "Routing and
providers": "``provider/model`` prefix, aliases, a provider's static ``models`` list,
then discovered models"; ``proxy/routing.py``'s docstring adds the ``catch_all`` last).

Each fake provider answers a chat completion naming itself and echoing the model it was
sent, and records that model, so every test tells which upstream got a request and under
which name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import openai
from aiohttp import web

from tests.conftest import MakeConfig, StartGateway, StartUpstream
from tests.routing_helpers import Fake, chat_with, start_fakes

Client = Callable[..., openai.AsyncOpenAI]


async def _discovered(gateway: str) -> None:
    """Wait (bounded) for the first discovery, so the snapshot is what routing sees."""
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
            f"{gateway}/v1/models") as response:
        assert response.status == 200


async def test_prefix_beats_an_alias_of_the_same_name(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a, b = Fake("a"), Fake("b")
    await start_fakes(start_upstream, a, b)
    config = make_config([a.provider(models=["x"]), b.provider(models=["x"])],
                         aliases={"b/x": "a/x"})
    client = openai_client(await start_gateway(config))
    assert await chat_with(client, "b/x") == ("b", "x")
    assert (a.models_sent, b.models_sent) == ([], ["x"])


async def test_alias_beats_a_static_model_of_the_same_name(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a, b = Fake("a"), Fake("b")
    await start_fakes(start_upstream, a, b)
    config = make_config([a.provider(models=["fast"]), b.provider(models=["llama"])],
                         aliases={"fast": "llama"})
    client = openai_client(await start_gateway(config))
    assert await chat_with(client, "fast") == ("b", "llama")
    assert (a.models_sent, b.models_sent) == ([], ["llama"])


async def test_static_list_beats_a_discovered_model_listed_earlier(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a, b = Fake("a", ["shared", "only-a"]), Fake("b")
    await start_fakes(start_upstream, a, b)
    gateway = await start_gateway(make_config([a.provider(), b.provider(models=["shared"])]))
    await _discovered(gateway)
    client = openai_client(gateway)
    assert await chat_with(client, "shared") == ("b", "shared")
    assert await chat_with(client, "only-a") == ("a", "only-a")  # discovery itself works
    assert (a.models_sent, b.models_sent) == (["only-a"], ["shared"])


async def test_first_provider_in_file_order_wins_among_static_lists(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    a, b, c = Fake("a"), Fake("b"), Fake("c")
    await start_fakes(start_upstream, a, b, c)
    config = make_config([a.provider(models=["other"]), b.provider(models=["m", "n"]),
                          c.provider(models=["n", "m"])])
    client = openai_client(await start_gateway(config))
    assert await chat_with(client, "m") == ("b", "m")
    assert await chat_with(client, "n") == ("b", "n")
    assert (a.models_sent, b.models_sent, c.models_sent) == ([], ["m", "n"], [])


async def test_catch_all_takes_only_names_no_other_rule_claims(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    catch = Fake("catch", ["disc"])  # listed first, and even lists the discovered name
    disc, stat = Fake("disc-p", ["disc"]), Fake("stat-p")
    await start_fakes(start_upstream, catch, disc, stat)
    config = make_config(
        [catch.provider(catch_all=True), disc.provider(), stat.provider(models=["stat"])],
        aliases={"al": "stat"})
    gateway = await start_gateway(config)
    await _discovered(gateway)
    client = openai_client(gateway)
    assert await chat_with(client, "disc") == ("disc-p", "disc")
    assert await chat_with(client, "stat") == ("stat-p", "stat")
    assert await chat_with(client, "al") == ("stat-p", "stat")
    assert await chat_with(client, "disc-p/free-name") == ("disc-p", "free-name")
    assert await chat_with(client, "nobody-claims-this") == ("catch", "nobody-claims-this")
    assert await chat_with(client, "other/with-slash") == ("catch", "other/with-slash")
    assert catch.models_sent == ["nobody-claims-this", "other/with-slash"]
    assert disc.models_sent == ["disc", "free-name"]
    assert stat.models_sent == ["stat", "stat"]


class _SlowListing(Fake):
    async def _list(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return await super()._list(request)


async def test_catch_all_does_not_take_a_discovered_name_before_discovery_ends(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    catch, disc = Fake("catch"), _SlowListing("disc-p", ["disc"])
    await start_fakes(start_upstream, catch, disc)
    config = make_config([catch.provider(catch_all=True), disc.provider()])
    client = openai_client(await start_gateway(config))
    assert await chat_with(client, "disc") == ("disc-p", "disc")
