"""Deployments, least-in-flight balancing, failover and fallbacks (issue #4).

Each deployment is a counting fake upstream (tests/fake_upstream.py) whose hook answers a
chat completion naming the deployment, or the statuses it is told to answer first, and
can hold requests until the test releases them, so a test can pin how many are in
flight where.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.config.breaker import BreakerSettings
from proxy.config.loader import ConfigError
from proxy.config.providers import ProviderConfig
from proxy.config.sections import LimitsConfig
from proxy.providers import build_provider
from proxy.resilience.breaker import CircuitBreaker
from proxy.resilience.concurrency import AdaptiveLimiter
from proxy.resilience.failover import Balancer
from proxy.routing import Route, Target
from tests import fake_upstream
from tests.conftest import MakeConfig, StartFake, StartGateway
from tests.fake_upstream import CHAT, FakeUpstream, Seen, replaced
from tests.wire import Reply, post_json

USER = [{"role": "user", "content": "hi"}]


@dataclass
class Deployment:
    """A deployment named ``name``: its counting fake upstream lists ``gpt-4o`` and
    answers a chat completion naming the deployment, or the ``statuses`` it is told to
    answer first, one per request; a request whose ``user`` is "hold" waits (bounded)
    for ``release``; ``arrived`` is set when a chat request comes."""

    name: str
    fake: FakeUpstream
    statuses: list[int] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.fake.chat.pieces = (self.name,)
        self.fake.hook = self._chat

    async def _chat(self, request: web.Request, seen: Seen) -> fake_upstream.Reply | None:
        if seen.path != CHAT:
            return None
        self.arrived.set()
        if (seen.json() or {}).get("user") == "hold":
            await asyncio.wait_for(self.release.wait(), 20)
        if not self.statuses:
            return None
        status = self.statuses.pop(0)
        return replaced(self.fake.chat, status=status, body={"error": {
            "message": f"{self.name} says {status}", "type": "x", "code": None}})

    @property
    def models(self) -> list[str | None]:
        """The model of each chat request, in order."""
        return [body.get("model") for body in self.fake.bodies()]

    def provider(self) -> dict[str, Any]:
        return self.fake.provider(self.name, discover=True)


Start = Callable[..., Awaitable[Deployment]]


@pytest.fixture
def deployment(start_fake: StartFake) -> Start:
    """``await deployment(name, **fields)`` -> a ``Deployment`` on its own fake upstream."""
    async def start(name: str, **fields: Any) -> Deployment:
        return Deployment(name, await start_fake(("gpt-4o",)), **fields)

    return start


async def _gateway(start_gateway: StartGateway, make_config: MakeConfig,
                   providers: list[dict[str, Any]], **raw: Any) -> str:
    raw.setdefault("cache", {"enabled": False})
    raw.setdefault("dedup", {"mode": "off"})
    return f"{await start_gateway(make_config(providers, **raw))}/v1/chat/completions"


async def _chat(session: aiohttp.ClientSession, url: str, model: str = "gpt-4o",
                **extra: Any) -> Reply:
    return await post_json(session, url, {"model": model, "messages": USER, **extra})


def _answered_by(reply: Reply) -> str:
    status, headers, body = reply
    assert status == 200, body
    content: str = orjson.loads(body)["choices"][0]["message"]["content"]
    assert headers["X-Gateway-Provider"] == content
    return content


async def test_idle_gateway_spreads_requests_over_deployments(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a, b = await deployment("a"), await deployment("b")
    url = await _gateway(start_gateway, make_config, [a.provider(), b.provider()],
                         deployments={"gpt-4o": ["a", "b"]})
    async with aiohttp.ClientSession() as session:
        answered = [_answered_by(await _chat(session, url)) for _ in range(6)]
    assert sorted(answered) == ["a"] * 3 + ["b"] * 3
    assert a.models == b.models == ["gpt-4o"] * 3


async def test_least_in_flight_deployment_takes_the_request(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    arrived = asyncio.Event()
    a, b = await deployment("a", arrived=arrived), await deployment("b", arrived=arrived)
    url = await _gateway(start_gateway, make_config, [a.provider(), b.provider()],
                         deployments={"gpt-4o": ["a", "b"]})
    async with aiohttp.ClientSession() as session:
        held = asyncio.ensure_future(_chat(session, url, user="hold"))
        await arrived.wait()
        busy, idle = (a, b) if a.models else (b, a)
        answered = [_answered_by(await _chat(session, url)) for _ in range(4)]
        assert answered == [idle.name] * 4  # plain turns would have alternated
        busy.release.set()
        assert _answered_by(await held) == busy.name


@pytest.mark.parametrize("failure", [503, 429, 500, "refused"])
async def test_failed_deployment_hands_the_request_to_the_next(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
    closed_port: int, failure: int | str,
) -> None:
    a, b = await deployment("a"), await deployment("b")
    if failure == "refused":
        a.fake.url = f"http://127.0.0.1:{closed_port}/v1"
    else:
        a.statuses = [int(failure)] * 10
    url = await _gateway(start_gateway, make_config, [a.provider(), b.provider()],
                         deployments={"gpt-4o": ["a", "b"]})
    async with aiohttp.ClientSession() as session:
        answered = [_answered_by(await _chat(session, url)) for _ in range(4)]
    assert answered == ["b"] * 4
    assert len(b.models) == 4


async def test_client_errors_are_relayed_not_failed_over(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a, b = await deployment("a", statuses=[400, 400]), await deployment("b", statuses=[400, 400])
    url = await _gateway(start_gateway, make_config, [a.provider(), b.provider()],
                         deployments={"gpt-4o": ["a", "b"]})
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await _chat(session, url)
    assert status == 400
    assert len(a.models) + len(b.models) == 1
    assert headers["X-Gateway-Provider"] in {"a", "b"}


async def test_fallback_model_answers_when_every_deployment_failed(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a, b, c = (await deployment("a", statuses=[502]), await deployment("b", statuses=[503]),
               await deployment("c"))
    url = await _gateway(
        start_gateway, make_config, [a.provider(), b.provider(), c.provider()],
        deployments={"gpt-4o": ["a", "b/gpt-4o-2024"], "gpt-4o-mini": ["c/mini-latest"]},
        fallbacks={"gpt-4o": ["gpt-4o-mini"]})
    async with aiohttp.ClientSession() as session:
        reply = await _chat(session, url)
    assert _answered_by(reply) == "c"
    assert (a.models, b.models, c.models) == (["gpt-4o"], ["gpt-4o-2024"], ["mini-latest"])
    assert orjson.loads(reply[2])["model"] == "mini-latest"


async def test_last_failure_is_what_the_client_sees(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
    closed_port: int,
) -> None:
    a, b = await deployment("a", statuses=[500]), await deployment("b", statuses=[429, 429])
    down = {"name": "down", "type": "openai_compat",
            "base_url": f"http://127.0.0.1:{closed_port}/v1"}
    url = await _gateway(start_gateway, make_config, [a.provider(), b.provider(), down],
                         deployments={"gpt-4o": ["a"], "small": ["b"], "tiny": ["down"]},
                         fallbacks={"gpt-4o": ["small"], "small": ["tiny"]})
    async with aiohttp.ClientSession() as session:
        status, headers, body = await _chat(session, url, model="small")
        assert (status, orjson.loads(body)["error"]["code"]) == (502, "upstream_unreachable")
        status, headers, body = await _chat(session, url)
        # Fallbacks are one level deep: gpt-4o -> small, not on to small's fallback.
        assert (status, headers["X-Gateway-Provider"]) == (429, "b")
        assert b"b says 429" in body


async def test_fallbacks_apply_to_a_single_provider_model(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a, b = await deployment("a", statuses=[503]), await deployment("b")
    providers = [{**a.provider(), "models": ["gpt-4o"]}, {**b.provider(), "models": ["mini"]}]
    url = await _gateway(start_gateway, make_config, providers,
                         fallbacks={"gpt-4o": ["mini"]}, aliases={"best": "gpt-4o"})
    async with aiohttp.ClientSession() as session:
        assert _answered_by(await _chat(session, url, model="best")) == "b"
        assert _answered_by(await _chat(session, url, model="gpt-4o")) == "a"
    assert b.models == ["mini"]


async def test_open_circuit_sends_requests_to_the_other_deployment(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a, b = await deployment("a", statuses=[503] * 2), await deployment("b")
    url = await _gateway(start_gateway, make_config, [a.provider(), b.provider()],
                         deployments={"gpt-4o": ["a", "b"]},
                         breaker={"min_requests": 2, "min_callers": 1, "cooldown": 60})
    async with aiohttp.ClientSession() as session:
        answered = [_answered_by(await _chat(session, url)) for _ in range(8)]
        async with session.get(url.replace("/v1/chat/completions", "/health")) as health:
            states = {p["name"]: p["breaker"]["state"]
                      for p in (await health.json())["providers"]}
    assert answered == ["b"] * 8
    assert len(a.models) == 2  # it failed twice, then was left alone
    assert states == {"a": "open", "b": "closed"}


async def test_a_deployment_refusing_connections_is_left_alone_once_its_breaker_opens(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
    closed_port: int,
) -> None:
    """Default breaker settings, two callers: every request fails over to the healthy
    deployment, and once the dead one's breaker opened it is not tried at all."""
    b = await deployment("b")
    dead = {"name": "a", "type": "openai_compat", "models": ["gpt-4o"],
            "base_url": f"http://127.0.0.1:{closed_port}/v1"}
    url = await _gateway(start_gateway, make_config, [dead, {**b.provider(),
                                                             "models": ["gpt-4o"]}],
                         deployments={"gpt-4o": ["a", "b"]}, health_cache_ttl=0)
    health = url.replace("/v1/chat/completions", "/health")
    sessions = [aiohttp.ClientSession(headers={"Authorization": f"Bearer sk-{n}"})
                for n in range(2)]
    try:
        async def breakers() -> dict[str, Any]:
            async with sessions[0].get(health) as response:
                return {p["name"]: p["breaker"] for p in (await response.json())["providers"]}

        # (callers change every third request: the turns alternate a and b)
        answered = [_answered_by(await _chat(sessions[n // 3 % 2], url)) for n in range(40)]
        opened = (await breakers())["a"]
        answered += [_answered_by(await _chat(sessions[n // 3 % 2], url)) for n in range(20)]
        after = await breakers()
    finally:
        for session in sessions:
            await session.close()
    assert answered == ["b"] * 60 and len(b.models) == 60
    assert (opened["state"], opened["window"]["failing_callers"]) == ("open", 2)
    assert after["a"]["window"]["calls"] == opened["window"]["calls"] >= 10  # left alone
    assert after["b"]["state"] == "closed"


async def test_provider_header_on_single_provider_dedup_and_cache(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a = await deployment("a")
    gateway = await start_gateway(make_config([{**a.provider(), "models": ["gpt-4o"]}]))
    url = f"{gateway}/v1/chat/completions"
    async with aiohttp.ClientSession() as session:
        first = await _chat(session, url, temperature=0)
        again = await _chat(session, url, temperature=0)
    assert _answered_by(first) == _answered_by(again) == "a"
    assert again[1]["X-Cache"] == "HIT"
    assert len(a.models) == 1


async def test_a_deployment_group_is_listed_as_a_model(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a, b = await deployment("a"), await deployment("b")
    providers = [{**a.provider(), "models": ["x"]}, {**b.provider(), "models": ["y"]}]
    gateway = await start_gateway(make_config(providers, deployments={"gpt-4o": ["a", "b"]}))
    async with aiohttp.ClientSession() as session, session.get(
            f"{gateway}/v1/models") as response:
        ids = [m["id"] for m in (await response.json())["data"]]
    assert ids == ["x", "y", "gpt-4o"]


@pytest.mark.parametrize(("raw", "problem"), [
    ({"deployments": {"gpt-4o": ["a", "nope"]}},
     "deployments.gpt-4o[1]: unknown provider 'nope' (known: a)"),
    ({"deployments": {"gpt-4o": []}},
     "deployments.gpt-4o: must be a non-empty list of provider names"),
    ({"deployments": {"gpt-4o": ["a", "a"]}}, "deployments.gpt-4o[1]: 'a' is listed twice"),
    ({"deployments": {"best": ["a"]}, "aliases": {"best": "gpt-4o"}},
     "deployments.best: 'best' is also an alias; a name is one or the other"),
    ({"deployments": {"a/x": ["a"]}},
     "deployments.a/x: 'a/x' would never be used: the 'provider/model' rule sends it to "
     "provider 'a'"),
    ({"fallbacks": {"gpt-4o": ["gpt-4o"]}},
     "fallbacks.gpt-4o: a model cannot be its own fallback"),
    ({"fallbacks": ["gpt-4o"]}, "fallbacks: must map model names to lists of model names"),
])
def test_routing_tables_are_validated(make_config: MakeConfig, raw: dict[str, Any],
                                      problem: str) -> None:
    provider = {"name": "a", "type": "openai_compat", "base_url": "http://127.0.0.1:1/v1"}
    with pytest.raises(ConfigError) as caught:
        make_config([provider], **raw)
    assert problem in caught.value.problems


@pytest.mark.parametrize("fail_fast", [False, True])
def test_balancer_skips_open_circuits_unless_all_are_open(fail_fast: bool) -> None:
    providers = [build_provider(ProviderConfig(name=n, type="openai_compat",
                                               base_url="http://127.0.0.1:1/v1"))
                 for n in ("a", "b", "c")]
    now = [0.0]
    breakers = {p.name: CircuitBreaker(p.name, BreakerSettings(
        min_requests=1, min_callers=1, cooldown=10, fail_fast=fail_fast),
        clock=lambda: now[0]) for p in providers}
    limiters = {p.name: AdaptiveLimiter(p.name, LimitsConfig()) for p in providers}
    balancer = Balancer(limiters, breakers)
    a, b, c = (Target(p, "m") for p in providers)
    route = Route(a.provider, "m", peers=(b,), fallbacks=((c,),))
    breakers["a"].record(failed=True)
    assert [balancer.candidates(route)[:2] for _ in range(2)] == [[b, c]] * 2
    breakers["b"].record(failed=False)
    breakers["b"].record(failed=True)  # open, with half its calls failed
    breakers["c"].record(failed=True)
    # Every one open: panic sends it to the least bad; fail_fast to a's circuit_open.
    assert balancer.candidates(route) == [a if fail_fast else b]
    now[0] = 11.0  # cooldown over: half-open deployments are tried again
    assert sorted(t.provider.name for t in balancer.candidates(route)[:2]) == ["a", "b"]


async def test_a_fallback_that_routes_nowhere_is_warned_about_once(
    deployment: Start, make_config: MakeConfig, start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = await deployment("a", statuses=[503, 503])
    url = await _gateway(start_gateway, make_config, [{**a.provider(), "models": ["gpt-4o"]}],
                         fallbacks={"gpt-4o": ["gpt-4o-minni"]})
    async with aiohttp.ClientSession() as session:
        async with session.get(url.replace("/chat/completions", "/models")) as response:
            assert response.status == 200  # discovery has run: the name is known unknown
        statuses = [(await _chat(session, url))[0] for _ in range(2)]
    assert statuses == [503, 503]
    warnings = [r.getMessage() for r in caplog.records if r.name == "proxy.routing"]
    assert warnings == ["fallbacks.gpt-4o: 'gpt-4o-minni' matches no provider's models; "
                        "skipped"]
