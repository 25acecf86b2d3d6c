"""Drop-in discovery (issue 9, part 3): with ``--upstream`` and no key of its own, the
gateway lists models with each caller's own key, never another caller's, and ``/health``
is 200 (a 401 without a key means "reachable, needs the caller's key"). The upstream is a
real aiohttp app that serves a different list per key and 401s without a known one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import aiohttp
import openai
import pytest

from tests.conftest import MakeConfig, StartFake, StartGateway
from tests.fake_upstream import FakeUpstream
from tests.keys_helpers import authorizations, keyed


async def _dropin(start_fake: StartFake, start_gateway: StartGateway,
                  make_config: MakeConfig, **raw: object) -> tuple[str, FakeUpstream]:
    upstream = keyed(await start_fake())
    provider = {"name": "upstream", "type": "openai_compat", "base_url": upstream.url,
                "catch_all": True}  # what --upstream URL builds (config/providers.py)
    return await start_gateway(make_config([provider], **raw)), upstream


async def test_each_caller_lists_the_upstreams_models_with_its_own_key(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    url, upstream = await _dropin(start_fake, start_gateway, make_config)
    a = openai_client(url, api_key="sk-caller-a")
    b = openai_client(url, api_key="sk-caller-b")
    for _ in range(2):  # the second round from the per-caller cache: still never mixed
        listed_a = (await a.models.list()).data
        assert [(m.id, m.created, m.owned_by) for m in listed_a] == [
            ("model-a", 1700000001, "org-a")]
        listed_b = (await b.models.list()).data
        assert [m.id for m in listed_b] == ["model-b1", "model-b2"]
        assert {m.owned_by for m in listed_b} == {"org-b"}
    model = await a.models.retrieve("model-a")
    assert (model.id, model.created, model.owned_by) == ("model-a", 1700000001, "org-a")
    with pytest.raises(openai.NotFoundError):
        await b.models.retrieve("model-a")  # A's model is not B's
    assert (await b.models.retrieve("model-b2")).owned_by == "org-b"
    assert {"Bearer sk-caller-a", "Bearer sk-caller-b"} <= set(authorizations(upstream))
    assert set(authorizations(upstream)) <= {None, "Bearer sk-caller-a", "Bearer sk-caller-b"}


async def test_a_wrong_key_lists_nothing_and_says_why(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    url, _ = await _dropin(start_fake, start_gateway, make_config)
    headers = {"Authorization": "Bearer sk-unknown"}
    async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/models",
                                                         headers=headers) as response:
        body = await response.json()
    assert body["data"] == []
    assert "rejected the credentials" in body["errors"][0]["message"]
    assert "sk-unknown" not in str(body)


async def test_health_is_200_when_the_upstream_only_wants_the_callers_key(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    url, upstream = await _dropin(start_fake, start_gateway, make_config)
    async with aiohttp.ClientSession() as http, http.get(f"{url}/health") as response:
        status, body = response.status, await response.json()
    assert status == 200, body
    assert body["status"] == "ok"
    [provider] = body["providers"]
    assert provider["status"] == "healthy" and provider["needs_caller_key"] is True
    assert provider["error"] is None
    assert None in authorizations(upstream)  # probed without any key: the gateway has none


async def test_with_gateway_keys_the_callers_key_is_never_sent_upstream(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    digest = hashlib.sha256(b"sk-caller-a").hexdigest()
    keys = {"keys": [{"name": "team", "sha256": digest}]}
    url, upstream = await _dropin(start_fake, start_gateway, make_config, auth=keys)
    client = openai_client(url, api_key="sk-caller-a")  # a gateway key, not an upstream one
    assert [m.id async for m in client.models.list()] == []
    assert "Bearer sk-caller-a" not in authorizations(upstream)
