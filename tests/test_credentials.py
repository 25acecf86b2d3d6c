"""Whose credentials go upstream (issue #2: "Upstream API keys are read from the env var
named by ``api_key_env`` and injected as ``Authorization: Bearer``"; the client's own
``Authorization`` is forwarded only where that is allowed).

* a configured key replaces the client's;
* ``forward_client_auth: false`` drops the client's;
* an ``api_key_env`` naming an unset variable never forwards the client's either
  (``forward_client_auth`` defaults to "no ``api_key_env``", ``proxy/config/loader.py``);
* with neither, the client's is forwarded (the drop-in's default);
* a failover leg to another provider carries that provider's credentials only (the
  first's key and configured headers once leaked to the second);
* a key's trailing newline is dropped, a line break inside it refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from proxy.config.loader import ConfigError, config_from_dict
from proxy.providers import PROVIDER_TYPES
from tests.conftest import MakeConfig, StartFake, StartGateway, StartLive, StartUpstream
from tests.fake_upstream import FakeUpstream

CLIENT_KEY = "sk-client-own-0123"
UPSTREAM_KEY = "sk-configured-upstream-4567"
UNSET = "CREDENTIALS_TEST_NEVER_SET"
Client = Callable[..., openai.AsyncOpenAI]


async def test_whose_authorization_goes_upstream(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    """Four providers on one upstream, told apart by their model."""
    upstream = await start_fake(pieces=("ok",))

    def provider(name: str, **extra: Any) -> dict[str, Any]:
        return upstream.provider(name, models=[f"m-{name}"], **extra)

    config = make_config([
        provider("keyed", api_key_env="CREDENTIALS_TEST_KEY"),
        provider("no-forward", forward_client_auth=False),
        provider("unset-key", api_key_env=UNSET),
        provider("plain"),
    ], env={"CREDENTIALS_TEST_KEY": UPSTREAM_KEY})
    client = openai_client(await start_gateway(config), api_key=CLIENT_KEY)
    for name in ("keyed", "no-forward", "unset-key", "plain"):
        answer = await client.chat.completions.create(
            model=f"m-{name}", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "ok"
    seen: dict[str, list[list[str]]] = {}
    for body, headers in zip(upstream.bodies(), upstream.headers(), strict=True):
        seen.setdefault(body["model"], []).append(headers.getall("Authorization", []))
    assert seen == {
        "m-keyed": [[f"Bearer {UPSTREAM_KEY}"]],  # replaced, not added beside the client's
        "m-no-forward": [[]],
        "m-unset-key": [[]],
        "m-plain": [[f"Bearer {CLIENT_KEY}"]],
    }



async def test_a_failover_leg_carries_only_its_own_providers_credentials(
    fake_upstream: FakeUpstream, start_upstream: StartUpstream, live_gateway: StartLive,
    openai_client: Client,
) -> None:
    """Provider ``a`` fails; ``b`` answers the same request. ``a``'s key and configured
    headers (an Azure-style ``api-key``) are ``a``'s: ``b`` gets the client's own
    Authorization (it has no key, so the drop-in forwards it) and its own headers only."""
    a, b = FakeUpstream(("gpt-4o",), status=500), FakeUpstream(("gpt-4o",))
    for fake in (a, b):
        fake.url = f"{await start_upstream(fake.app())}/v1"
    gateway = await live_gateway(
        a.provider("a", api_key_env="CREDENTIALS_TEST_A", headers={"api-key": "secret-of-a"}),
        b.provider("b", headers={"X-Title": "b's"}),
        deployments={"gpt-4o": ["a", "b"]}, env={"CREDENTIALS_TEST_A": UPSTREAM_KEY},
        cache={"enabled": False}, dedup={"mode": "off"})
    client = openai_client(gateway.url, api_key=CLIENT_KEY)
    for _ in range(3):
        answer = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
    assert a.chats >= 1 and b.chats == 3
    for headers in a.headers():
        assert headers.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]
        assert headers.getall("api-key") == ["secret-of-a"]
        assert "X-Title" not in headers
    for headers in b.headers():
        assert headers.getall("Authorization") == [f"Bearer {CLIENT_KEY}"]
        assert headers.getall("X-Title") == ["b's"]
        assert "api-key" not in headers


def test_a_keys_trailing_newline_is_dropped_and_a_line_break_inside_is_refused() -> None:
    """A key read from a file keeps its last newline (``KEY="$(cat f)"`` drops it, a
    Kubernetes secret does not): stripped. A key with a line break or control character
    inside would split the upstream request's head: refused at load, never shown."""
    entry = {"name": "up", "type": "openai_compat", "base_url": "http://127.0.0.1:9/v1",
             "api_key_env": "CREDENTIALS_TEST_KEY"}
    config = config_from_dict({"providers": [entry]}, {"CREDENTIALS_TEST_KEY": "sk-abc\n"},
                              PROVIDER_TYPES.keys())
    assert config.providers[0].api_key == "sk-abc"
    for bad in ("sk-abc\r\nX-Injected: 1", "sk-\x00abc", "sk-abc\tdef"):
        with pytest.raises(ConfigError) as caught:
            config_from_dict({"providers": [entry]}, {"CREDENTIALS_TEST_KEY": bad},
                             PROVIDER_TYPES.keys())
        assert caught.value.problems == [
            "providers[0].api_key_env: the value of CREDENTIALS_TEST_KEY is not one line "
            "of printable ASCII (the key is not shown)"]
        assert "sk-" not in str(caught.value)
