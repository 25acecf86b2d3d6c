"""Gateway keys (issue #4, "Gateway keys and rate limits"): hashed secrets in the config,
a Bearer check, 401 OpenAI-shaped, allowed models, keys never forwarded upstream, an
open gateway when none are configured (with a warning), and ``proxy keys hash``."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest

from proxy.config.keys import hash_secret
from proxy.config.loader import ConfigError
from tests.conftest import MakeConfig, StartFake, StartGateway
from tests.fake_upstream import FakeUpstream
from tests.keys_helpers import MESSAGES

SECRET_A = "sk-gw-team-a-secret-for-tests"
SECRET_B = "sk-gw-team-b-secret-for-tests"
KEYS = [{"name": "team-a", "sha256": hash_secret(SECRET_A)},
        {"name": "team-b", "sha256": hash_secret(SECRET_B), "models": ["up/small-*"]}]


async def gateway(start_fake: StartFake, start_gateway: StartGateway,
                  make_config: MakeConfig, **provider: Any) -> tuple[str, FakeUpstream]:
    """(gateway URL, the upstream, which keeps the headers it got) with ``KEYS``."""
    upstream = await start_fake(models=("small-1", "large-1"))
    return await start_gateway(make_config([upstream.provider(**provider)],
                                           auth={"keys": KEYS})), upstream


async def test_a_known_key_passes_and_never_goes_upstream(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    base, upstream = await gateway(start_fake, start_gateway, make_config)
    client = openai_client(base, api_key=SECRET_A)
    answer = await client.chat.completions.create(model="large-1", messages=MESSAGES)
    assert answer.id == "answer-1"
    # A provider without its own key would forward the client's Authorization: never
    # when that Authorization was the gateway's key.
    assert "Authorization" not in upstream.headers()[0]
    assert SECRET_A not in str(list(upstream.headers()[0].items()))


async def test_a_provider_key_replaces_the_gateway_key(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    upstream = await start_fake()
    url = upstream.url.removesuffix("/v1")
    base = await start_gateway(make_config([{
        "name": "up", "type": "openai_compat", "base_url": f"{url}/v1", "models": ["m"],
        "api_key_env": "UP_KEY"}], env={"UP_KEY": "sk-upstream"}, auth={"keys": KEYS}))
    await openai_client(base, api_key=SECRET_A).chat.completions.create(
        model="m", messages=MESSAGES)
    assert upstream.headers()[0].getall("Authorization") == ["Bearer sk-upstream"]


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer sk-gw-wrong"}, {"Authorization": "Basic dXNlcjpwdw=="},
    {"Authorization": "Bearer"}, {"Authorization": f"bearer {SECRET_A}x"}])
async def test_a_missing_or_wrong_key_is_401_openai_shaped(
    headers: dict[str, str], start_fake: StartFake, start_gateway: StartGateway,
    make_config: MakeConfig,
) -> None:
    base, upstream = await gateway(start_fake, start_gateway, make_config)
    async with aiohttp.ClientSession() as session:
        for path, method in (("/v1/chat/completions", "POST"), ("/v1/models", "GET"),
                             ("/v1/models/large-1", "GET")):
            async with session.request(method, base + path, headers=headers,
                                       json={"model": "large-1", "messages": MESSAGES}) as r:
                body = await r.json()
                assert r.status == 401, (path, body)
                assert body["error"]["type"] == "invalid_request_error"
                assert body["error"]["code"] == "invalid_api_key"
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert r.headers["X-Request-ID"]
                assert "sk-gw" not in str(body)
    assert upstream.headers() == []


async def test_the_sdk_raises_authentication_and_permission_errors(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    base, upstream = await gateway(start_fake, start_gateway, make_config)
    with pytest.raises(openai.AuthenticationError):
        await openai_client(base, api_key="sk-gw-nobody").chat.completions.create(
            model="large-1", messages=MESSAGES)
    team_b = openai_client(base, api_key=SECRET_B)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await team_b.chat.completions.create(model="large-1", messages=MESSAGES)
    assert "team-b" in str(denied.value) and "large-1" in str(denied.value)
    answer = await team_b.chat.completions.create(model="small-1", messages=MESSAGES)
    assert answer.model == "small-1"
    assert len(upstream.headers()) == 1


async def test_the_models_listing_shows_what_the_key_may_use(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    base, _ = await gateway(start_fake, start_gateway, make_config)
    team_a = [m.id async for m in openai_client(base, api_key=SECRET_A).models.list()]
    team_b = openai_client(base, api_key=SECRET_B)
    assert sorted(team_a) == ["large-1", "small-1"]
    assert [m.id async for m in team_b.models.list()] == ["small-1"]
    with pytest.raises(openai.NotFoundError):
        await team_b.models.retrieve("large-1")


async def test_liveness_and_health_need_no_key(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    base, _ = await gateway(start_fake, start_gateway, make_config)
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/health"):
            async with session.get(base + path) as response:
                assert response.status in (200, 503), path
                assert response.status != 401


async def test_without_keys_the_gateway_is_open_and_says_so(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    openai_client: Callable[..., openai.AsyncOpenAI], caplog: pytest.LogCaptureFixture,
) -> None:
    upstream = await start_fake()
    url = upstream.url.removesuffix("/v1")
    with caplog.at_level(logging.WARNING, logger="proxy.app"):
        base = await start_gateway(make_config([{
            "name": "up", "type": "openai_compat", "base_url": f"{url}/v1",
            "models": ["m"]}]))
    assert any("no gateway keys" in r.getMessage() for r in caplog.records)
    client = openai_client(base, api_key="sk-client-own")
    await client.chat.completions.create(model="m", messages=MESSAGES)
    assert upstream.headers()[0]["Authorization"] == "Bearer sk-client-own"  # drop-in: forwarded


@pytest.mark.parametrize(("keys", "problem"), [
    ("not-a-list", "auth.keys: must be a list of keys"),
    ([{"name": "a"}], "auth.keys[0].sha256: is required"),
    ([{"name": "a", "sha256": "abc"}], "auth.keys[0].sha256: must be the 64 hex digits"),
    ([{"name": "a", "sha256": "0" * 64, "secret": "x"}], "auth.keys[0].secret: unknown key"),
    ([{"name": "a", "sha256": "0" * 64}, {"name": "a", "sha256": "1" * 64}],
     "auth.keys[1].name: duplicate key name 'a'"),
    ([{"name": "a", "sha256": "0" * 64}, {"name": "b", "sha256": "0" * 64}],
     "auth.keys[1].sha256: the same secret as another key"),
])
def test_invalid_keys_are_config_errors(keys: Any, problem: str,
                                        make_config: MakeConfig) -> None:
    with pytest.raises(ConfigError) as raised:
        make_config([], auth={"keys": keys})
    assert any(p.startswith(problem) for p in raised.value.problems), raised.value.problems


def test_cli_keys_hash_prints_a_new_secret_once_and_its_hash() -> None:
    done = subprocess.run([sys.executable, "-m", "proxy", "keys", "hash", "--name", "ci"],
                          capture_output=True, text=True, timeout=30, check=True)
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines()[:2])
    secret = lines["secret"].split()[0]
    assert secret.startswith("sk-gw-") and len(secret) > 40
    assert lines["sha256"] == hash_secret(secret)
    assert f"sha256: {hash_secret(secret)}" in done.stdout.split("config:")[1]
    given = subprocess.run([sys.executable, "-m", "proxy", "keys", "hash", "--secret", "abc"],
                           capture_output=True, text=True, timeout=30, check=True)
    assert "secret:" not in given.stdout
    assert given.stdout.startswith(f"sha256: {hash_secret('abc')}")


async def test_gateway_keys_stay_out_of_logs_errors_health_and_upstreams(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    base, upstream = await gateway(start_fake, start_gateway, make_config)
    texts: list[str] = []
    async with aiohttp.ClientSession() as session:
        for secret, model in ((SECRET_A, "large-1"), (SECRET_B, "large-1"),
                              (SECRET_A + "x", "large-1"), (SECRET_A, "no-such-model")):
            async with session.post(f"{base}/v1/chat/completions",
                                    headers={"Authorization": f"Bearer {secret}"},
                                    json={"model": model, "messages": MESSAGES}) as r:
                texts.append(f"{r.status} {dict(r.headers)} {await r.text()}")
        for path in ("/health", "/healthz"):
            async with session.get(base + path) as r:
                texts.append(await r.text())
    assert [t.split()[0] for t in texts[:4]] == ["200", "403", "401", "404"]
    assert caplog.records
    for secret in (SECRET_A, SECRET_B):
        assert not [t for t in texts if secret in t]
        assert secret not in caplog.text
        assert not [h for h in upstream.headers(None) for v in h.values() if secret in v]
