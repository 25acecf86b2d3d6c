"""``GET /metrics`` (issue 10): after known traffic through a real gateway app to a real
upstream on loopback, the scraped text, parsed by prometheus-client's own parser, holds
exactly that traffic's figures, under bounded labels, without secrets, and only an
admin key may read it when gateway keys are configured. (Across ``--workers N``:
tests/test_metrics_workers.py.)"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import string
import timeit
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from proxy import __version__
from proxy.app import build_app
from proxy.config.keys import hash_secret
from proxy.config.loader import Config
from proxy.observe.metrics import METRICS
from proxy.observe.observers import OBSERVERS
from proxy.record import Origin, Record, Usage
from proxy.server.serve import running
from tests.assertions import Samples, parse, value
from tests.conftest import MakeConfig, StartFake
from tests.fake_upstream import FakeUpstream, Reply, Seen, replaced
from tests.polling import until
from tests.running import RunningGateway

ADMIN, TEAM, LIMITED = "sk-gw-admin-0123456789", "sk-gw-team-a-0123456789", "sk-gw-b-987654321"
KEYS = [{"name": "ops", "sha256": hash_secret(ADMIN), "admin": True},
        {"name": "team-a", "sha256": hash_secret(TEAM)},
        {"name": "team-b", "sha256": hash_secret(LIMITED), "rpm": 1}]
ANSWER = {"id": "x", "object": "chat.completion", "choices": [],
          "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}
CHAT = "/v1/chat/completions"


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


def answering(fake: FakeUpstream) -> FakeUpstream:
    """``fake`` answers ``ANSWER`` (with its usage), a stream as one empty chunk."""
    fake.chat.body = ANSWER
    fake.chat.events = (b'data: {"choices":[]}\n\n', b"data: [DONE]\n\n")
    return fake


@asynccontextmanager
async def gateway(config: Config, usage: Usage | None = None) -> AsyncIterator[str]:
    """The URL of ``served(config, usage)``."""
    async with served(config, usage) as (url, _):
        yield url


@asynccontextmanager
async def served(config: Config, usage: Usage | None = None
                 ) -> AsyncIterator[tuple[str, web.Application]]:
    """The gateway app in-process, and its URL; ``usage``: what the (parallel) usage helper would
    have put on each answered chat's record, set by an observer run before metrics."""
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, host="127.0.0.1", port=0))
    app = build_app(config)

    def fill(records: list[Record]) -> None:
        for record in records:
            if usage is not None and record.path == CHAT and record.status == 200:
                record.usage = usage

    app[OBSERVERS].observers.insert(1, fill)  # after the deferred usage is read
    async with running(config, app=app) as url:
        yield url, app


async def scrape(session: aiohttp.ClientSession, url: str, key: str | None = ADMIN
                 ) -> tuple[str, Samples]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with session.get(f"{url}/metrics", headers=headers) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    return text, parse(text)


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
               key: str | None = TEAM, **headers: str) -> int:
    if key:
        headers["Authorization"] = f"Bearer {key}"
    async with session.post(f"{url}{CHAT}", json=body, headers=headers) as response:
        await response.read()
        return response.status


def scripted(fake: FakeUpstream, pair: asyncio.Event) -> FakeUpstream:
    """``fake`` is ``answering``, and holds the dedup pair's leader until ``pair`` is
    set."""
    answering(fake)
    held = replaced(fake.chat, gate=pair)

    async def hook(request: web.Request, seen: Seen) -> Reply | None:
        return held if (seen.json() or {}).get("seed") == 7 else None

    fake.hook = hook
    return fake


async def known_traffic(session: aiohttp.ClientSession, live: RunningGateway,
                        pair: asyncio.Event) -> None:
    """The traffic the figures are known for; ``pair`` releases the dedup pair's leader
    once its follower joined."""
    url, upstream = live.url, live.upstream
    for i in range(3):
        assert await post(session, url, chat(f"plain {i}")) == 200
    assert await post(session, url, chat("a stream", stream=True)) == 200
    assert await post(session, url, {**chat("x"), "model": "no-such-model"}) == 404
    assert await post(session, url, chat("no key"), key=None) == 401
    for _ in range(2):  # the second is a cache hit
        assert await post(session, url, chat("cached", temperature=0)) == 200
    leader = asyncio.ensure_future(post(session, url, chat("pair", seed=7),
                                        **{"Cache-Control": "no-store"}))
    await until(lambda: upstream.inflight == 1, what="the leader held at the upstream")
    follower = asyncio.ensure_future(post(session, url, chat("pair", seed=7),
                                          **{"Cache-Control": "no-store"}))
    await live.until(lambda: live.inflight.followed == 1, what="the follower joining")
    pair.set()
    assert await follower == 200
    assert await leader == 200
    assert await post(session, url, chat("limited 1"), key=LIMITED) == 200
    assert await post(session, url, chat("limited 2"), key=LIMITED) == 429


async def test_known_traffic_gives_exact_figures_and_no_secrets(
    start_fake: StartFake, make_config: MakeConfig,
) -> None:
    pair = asyncio.Event()
    upstream = scripted(await start_fake(), pair)
    config = make_config([upstream.provider()], auth={"keys": KEYS})
    async with served(config, Usage(input=3, output=5, cached=2)) as (gw, app), \
            aiohttp.ClientSession() as session:
        await known_traffic(session, RunningGateway(gw, app, upstream), pair)
        text, samples = await scrape(session, gw)
        _, again = await scrape(session, gw)

    ok = {"route": CHAT, "model": "m", "provider": "up", "status": "200"}
    assert value(samples, "gateway_requests_total", **ok) == 9  # 3+1+2+2+1 of team-b
    assert value(samples, "gateway_requests_total", route=CHAT, model="other",
                 provider="none", status="404") == 1
    assert value(samples, "gateway_requests_total", route=CHAT, model="none",
                 provider="none", status="401") == 1  # named though refused before routing
    assert value(samples, "gateway_requests_total", route=CHAT, model="m",
                 provider="up", status="429") == 1
    assert value(samples, "gateway_rate_limited_requests_total", key="team-b") == 1
    # Not the cache hit nor the follower: they sent nothing upstream.
    assert value(samples, "gateway_upstream_attempts_total", outcome="success") == 7
    assert value(samples, "gateway_cache_lookups_total", result="hit") == 1
    assert value(samples, "gateway_cache_lookups_total", result="miss") == 1
    assert value(samples, "gateway_dedup_requests_total", role="leader") == 2
    assert value(samples, "gateway_dedup_requests_total", role="follower") == 1
    assert value(samples, "gateway_stream_endings_total", reason="completed") == 1
    assert value(samples, "gateway_requests_in_flight") == 1  # this scrape
    assert value(samples, "http_server_request_duration_seconds_count",
                 http_request_method="POST", http_route=CHAT,
                 http_response_status_code="200") == 9
    assert value(samples, "gateway_overhead_seconds_count") == 12
    assert value(samples, "gateway_overhead_seconds_bucket", le="0.0001") <= 12
    model = {"gen_ai_operation_name": "chat", "gen_ai_request_model": "m",
             "gen_ai_provider_name": "up"}
    assert value(samples, "gen_ai_client_operation_duration_seconds_count",
                 error_type="", **model) == 9
    assert value(samples, "gen_ai_client_operation_duration_seconds_bucket",
                 error_type="", le="900.0", **model) == 9
    assert value(samples, "gen_ai_client_operation_time_to_first_chunk_seconds_count",
                 **model) == 9
    for kind, tokens in (("input", 3), ("output", 5), ("cached", 2)):
        assert value(samples, "gen_ai_client_token_usage_sum", gen_ai_token_type=kind,
                     **model) == 9 * tokens
    assert value(samples, "gen_ai_client_token_usage_count", gen_ai_token_type="reasoning",
                 **model) == 0
    assert value(samples, "gateway_build_info", version=__version__) == 1
    assert value(samples, "gateway_circuit_breaker_state", provider="up") == 0
    assert value(samples, "gateway_concurrency_limit", provider="up") > 0
    assert ("gateway_concurrency_queue_length", frozenset({("provider", "up")})) in samples
    # The first scrape is counted once it has ended: a counter, seen by the next one.
    assert value(again, "gateway_requests_total", route="/metrics", model="none",
                 provider="none", status="200") == 1
    for secret in (ADMIN, TEAM, LIMITED):
        assert secret not in text and hash_secret(secret) not in text


async def test_attempts_by_outcome_and_an_open_breaker(
    start_fake: StartFake, make_config: MakeConfig, closed_port: int,
) -> None:
    """A retry, a failover, a fallback and failures, each counted once; the failing
    provider's breaker shows open."""
    upstream = answering(await start_fake())
    busy = replaced(upstream.chat, status=503, body={"error": {"message": "busy"}})
    failed_once: set[str] = set()

    async def flaky(request: web.Request, seen: Seen) -> Reply | None:
        if (seen.json() or {}).get("model") == "f" and "f" not in failed_once:
            failed_once.add("f")
            return busy
        return None

    upstream.hook = flaky
    dead = {"name": "dead", "type": "openai_compat",
            "base_url": f"http://127.0.0.1:{closed_port}/v1", "models": ["d", "fb"]}
    config = make_config(
        [upstream.provider(), upstream.provider("flaky", models=["f"]), dead],
        deployments={"pair": ["dead", "up"]}, fallbacks={"fb": ["m"]},
        dedup={"mode": "off"}, cache={"enabled": False},
        retries={"max_attempts": 2, "base_delay": 0.01, "budget": 1.0},
        breaker={"min_requests": 5, "min_callers": 1, "cooldown": 300})
    async with gateway(config) as gw, aiohttp.ClientSession() as session:
        assert await post(session, gw, {**chat("x"), "model": "f"}, key=None) == 200
        for _ in range(2):  # the balancer takes turns: one meets "dead" first
            assert await post(session, gw, {**chat("x"), "model": "pair"}, key=None) == 200
        assert await post(session, gw, {**chat("x"), "model": "fb"}, key=None) == 200
        for _ in range(3):
            assert await post(session, gw, {**chat("x"), "model": "d"}, key=None) == 502
        _, samples = await scrape(session, gw, key=None)
    attempts = {outcome: value(samples, "gateway_upstream_attempts_total", outcome=outcome)
                for outcome in ("success", "retry", "failover", "fallback", "error")}
    # Retries: "f"'s one, and the first "d"'s (its 2 failures, with the failover and
    # fallback legs' 2, reach min_requests: the breaker opens and no later try retries).
    assert attempts == {"success": 4, "retry": 2, "failover": 1, "fallback": 1, "error": 3}
    states = {name: value(samples, "gateway_circuit_breaker_state", provider=name)
              for name in ("up", "flaky", "dead")}
    assert states == {"up": 0, "flaky": 0, "dead": 2}


async def test_metrics_need_an_admin_key_once_keys_are_configured(
    fake_upstream: FakeUpstream, make_config: MakeConfig,
) -> None:
    async with gateway(make_config([fake_upstream.provider()], auth={"keys": KEYS})) as gw, \
            aiohttp.ClientSession() as session:
        async with session.get(f"{gw}/metrics") as response:
            assert response.status == 401
        async with session.get(f"{gw}/metrics",
                               headers={"Authorization": f"Bearer {TEAM}"}) as response:
            assert response.status == 403
            assert (await response.json())["error"]["code"] == "admin_key_required"
        await scrape(session, gw, ADMIN)
    async with gateway(make_config([fake_upstream.provider()])) as gw, \
            aiohttp.ClientSession() as session:
        await scrape(session, gw, key=None)  # no keys: open, like every other path


async def test_fifty_unknown_model_names_are_all_other(
    start_fake: StartFake, make_config: MakeConfig,
) -> None:
    """A catch-all provider answers any name; the labels still take only known ones:
    the config's and the discovered ones."""
    upstream = answering(await start_fake(("found",)))
    config = make_config([upstream.provider("disc", discover=True),
                          upstream.provider(models=["m"], catch_all=True)])
    rng = random.Random(10)
    names = ["".join(rng.choices(string.ascii_lowercase, k=12)) for _ in range(50)]
    async with gateway(config) as gw, aiohttp.ClientSession() as session:
        for name in names:
            assert await post(session, gw, {**chat("hi"), "model": name}, key=None) == 200
        assert await post(session, gw, chat("known"), key=None) == 200
        assert await post(session, gw, {**chat("hi"), "model": "found"}, key=None) == 200
        text, samples = await scrape(session, gw, key=None)
    assert value(samples, "gateway_requests_total", route=CHAT, model="other",
                 provider="up", status="200") == 50
    assert value(samples, "gateway_requests_total", route=CHAT, model="m",
                 provider="up", status="200") == 1
    assert value(samples, "gateway_requests_total", route=CHAT, model="found",
                 provider="disc", status="200") == 1
    assert not [name for name in names if name in text]


async def test_the_observer_costs_microseconds(
    fake_upstream: FakeUpstream, make_config: MakeConfig,
) -> None:
    """The figure for the report: one realistic record, observed again and again (the
    children are cached after the first, records counted in batches); none is lost."""
    config = make_config([fake_upstream.provider()])
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, host="127.0.0.1", port=0))
    app = build_app(config)
    record = Record(1.0, "POST", CHAT, model="m", stream=True,
                    origin=Origin("up", "m"), cache="miss", dedup="leader", status=200,
                    upstream_status=200, upstream_wait=0.4, first_byte=1.5, finished=2.0,
                    usage=Usage(10, 20))
    metrics = app[METRICS]
    runs = 64 * 300
    batch = [record] * 64  # as observers.Observers hands them
    seconds = timeit.timeit(lambda: metrics.observe(batch), number=runs // 64)
    print(f"Metrics.observe: {seconds / runs * 1e6:.2f} us per request")
    assert seconds / runs < 200e-6  # generous: a loaded 2-core machine
    counted = parse(metrics.exposition().decode())  # batched records included
    assert value(counted, "gateway_requests_total", route=CHAT, model="m", provider="up",
                 status="200") == runs
    assert value(counted, "gen_ai_client_token_usage_sum", gen_ai_operation_name="chat",
                 gen_ai_request_model="m", gen_ai_provider_name="up",
                 gen_ai_token_type="output") == 20 * runs
