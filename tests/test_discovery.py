"""Parallel model discovery, its cache, health endpoints and the ``models``/``check`` CLI
(issue #2, "Parallel model discovery").

The fake providers are counting fake upstreams (tests/fake_upstream.py) whose
``/v1/models`` answer is scripted per test; a hook counts how many listings are in
flight at once across providers.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from tests.cli_helpers import run_cli
from tests.conftest import MakeConfig, StartFake, StartGateway
from tests.fake_upstream import MODELS, FakeUpstream, Reply, Seen
from tests.polling import until

SECRET = "sk-discovery-secret-0123456789"


Start = Callable[..., Awaitable[FakeUpstream]]


@pytest.fixture
def fake(start_fake: StartFake) -> Start:
    """``await fake(models, latency=0, status=200, hang=None)`` -> a fake upstream whose
    ``/v1/models`` lists ``models`` after ``latency`` s, or answers ``status``; with
    ``hang`` it waits for that event first."""
    async def start(models: list[str], latency: float = 0.0, status: int = 200,
                    hang: asyncio.Event | None = None) -> FakeUpstream:
        upstream = await start_fake(tuple(models))
        upstream.models = Reply(latency=latency, status=status, gate=hang)
        return upstream

    return start


def listings(fake: FakeUpstream) -> int:
    return fake.calls[MODELS]


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def _get(url: str) -> tuple[int, dict[str, Any], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        raw = await response.read()
        return response.status, orjson.loads(raw), raw


async def test_all_providers_are_asked_at_once(
    fake: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    fakes = [await fake([f"model-{i}"], latency=0.5) for i in range(5)]
    together: list[int] = []  # listings in flight across providers, as each arrives

    async def count(request: web.Request, seen: Seen) -> None:
        together.append(sum(f.inflight for f in fakes))

    for upstream in fakes:
        upstream.hook = count
    started = time.perf_counter()
    gateway = await start_gateway(make_config(
        [f.provider(f"p{i}", discover=True) for i, f in enumerate(fakes)]))
    status, body, _ = await _get(f"{gateway}/v1/models")
    elapsed = time.perf_counter() - started
    assert status == 200
    assert sorted(m["id"] for m in body["data"]) == [f"model-{i}" for i in range(5)]
    assert "errors" not in body
    assert max(together) == 5
    assert elapsed < 1.2, f"discovery took {elapsed:.2f} s: providers were asked in series"
    assert [listings(f) for f in fakes] == [1] * 5


@pytest.mark.parametrize("failure", ["http_500", "closed_port", "hangs"])
async def test_one_failing_provider_leaves_the_others_listed(
    fake: Start, make_config: MakeConfig, start_gateway: StartGateway,
    failure: str,
) -> None:
    release = asyncio.Event()
    good = [await fake([f"model-{i}"], latency=0.3) for i in range(3)]
    bad = await fake(["never"], status=500 if failure == "http_500" else 200,
                     hang=release if failure == "hangs" else None)
    if failure == "closed_port":
        bad.url = _closed_port_url()
    named = [g.provider(f"good{i}", discover=True) for i, g in enumerate(good)]
    config = make_config([named[0], bad.provider("bad", discover=True), *named[1:]],
                         timeouts={"discovery": 1})
    try:
        started = time.perf_counter()
        gateway = await start_gateway(config)
        status, body, _ = await _get(f"{gateway}/v1/models")
        elapsed = time.perf_counter() - started
    finally:
        release.set()
    assert status == 200
    assert sorted(m["id"] for m in body["data"]) == ["model-0", "model-1", "model-2"]
    assert [e["provider"] for e in body["errors"]] == ["bad"]
    assert body["errors"][0]["message"]
    assert elapsed < 1.5, f"a failing provider delayed the listing to {elapsed:.2f} s"


async def test_second_listing_is_served_from_cache(
    fake: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    upstream = await fake(["m1", "m2"])
    gateway = await start_gateway(make_config([upstream.provider("p", discover=True)]))
    first = await _get(f"{gateway}/v1/models")
    second = await _get(f"{gateway}/v1/models")
    assert [m["id"] for m in second[1]["data"]] == ["m1", "m2"]
    assert second[1] == first[1]
    assert listings(upstream) == 1


async def test_stale_listing_is_served_while_refreshing(
    fake: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    upstream = await fake(["m1"], latency=0.3)
    gateway = await start_gateway(make_config([upstream.provider("p", discover=True)],
                                              models_cache_ttl=0.3))
    await _get(f"{gateway}/v1/models")
    assert listings(upstream) == 1
    await asyncio.sleep(0.35)  # past the TTL
    upstream.model_ids = ["m1", "m2"]
    started = time.perf_counter()
    _, stale, _ = await _get(f"{gateway}/v1/models")
    assert time.perf_counter() - started < 0.2, "a stale listing waited for the refresh"
    assert [m["id"] for m in stale["data"]] == ["m1"]
    await until(lambda: listings(upstream) == 2, within=0.2)

    async def refreshed() -> bool:
        _, body, _ = await _get(f"{gateway}/v1/models")
        return [m["id"] for m in body["data"]] == ["m1", "m2"]

    await until(refreshed)


async def test_healthz_never_touches_upstreams(
    fake: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    upstream = await fake(["m1"])
    gateway = await start_gateway(make_config([upstream.provider("p", discover=True)],
                                              health_cache_ttl=0))
    await until(lambda: listings(upstream) == 1 and upstream.inflight == 0)  # start-up
    for _ in range(3):
        status, body, _ = await _get(f"{gateway}/healthz")
        assert status == 200
        assert body["status"] == "ok"
    assert listings(upstream) == 1


async def test_health_reports_each_provider_without_secrets(
    fake: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    good, bad = await fake(["m1", "m2"], latency=0.05), await fake([], status=500)
    config = make_config([good.provider("good", discover=True, api_key_env="GOOD_KEY"),
                          bad.provider("bad", discover=True)],
                         env={"GOOD_KEY": SECRET}, health_cache_ttl=0.3)
    gateway = await start_gateway(config)
    status, body, raw = await _get(f"{gateway}/health")
    assert status == 200
    by_name = {p["name"]: p for p in body["providers"]}
    assert list(by_name) == ["good", "bad"]
    assert by_name["good"]["status"] == "healthy"
    assert by_name["good"]["models"] == 2
    assert by_name["good"]["error"] is None
    assert 40 <= by_name["good"]["latency_ms"] < 1000
    assert by_name["bad"]["status"] == "unhealthy"
    assert by_name["bad"]["models"] == 0
    assert "500" in by_name["bad"]["error"]
    assert SECRET.encode() not in raw
    assert good.headers(MODELS)[0].get("Authorization") == f"Bearer {SECRET}"
    calls = listings(good)
    await _get(f"{gateway}/health")
    assert listings(good) == calls, "/health probed again within health_cache_ttl"
    await asyncio.sleep(0.35)
    await _get(f"{gateway}/health")
    assert listings(good) == calls + 1, "/health did not probe again after health_cache_ttl"


async def test_health_is_503_when_every_provider_fails(
    fake: Start, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    bad = await fake([], status=500)
    gone = {"name": "gone", "type": "openai_compat", "base_url": _closed_port_url()}
    gateway = await start_gateway(make_config([bad.provider("bad", discover=True), gone]))
    status, body, _ = await _get(f"{gateway}/health")
    assert status == 503
    assert [(p["name"], p["status"]) for p in body["providers"]] == [
        ("bad", "unhealthy"), ("gone", "unhealthy")]
    assert all(p["error"] for p in body["providers"])


def _write_config(path: Path, providers: list[dict[str, Any]]) -> str:
    path.write_text(yaml.safe_dump({"providers": providers, "timeouts": {"discovery": 2}}))
    return str(path)


async def test_cli_models_and_check(fake: Start, tmp_path: Path) -> None:
    good, bad = await fake(["alpha", "org/beta"]), await fake([], status=500)
    good_entry, bad_entry = good.provider("good", discover=True), bad.provider("bad", discover=True)
    mixed = _write_config(tmp_path / "mixed.yaml", [good_entry, bad_entry])
    healthy = _write_config(tmp_path / "healthy.yaml", [good_entry])
    as_json, table, check_mixed, check_healthy = await asyncio.gather(
        run_cli("models", "--json", "--config", mixed), run_cli("models", "--config", mixed),
        run_cli("check", "--config", mixed), run_cli("check", "--config", healthy))

    assert as_json[0] == 0
    providers = {p["provider"]: p for p in orjson.loads(as_json[1])["providers"]}
    assert providers["good"]["healthy"] is True
    assert providers["good"]["models"] == ["alpha", "org/beta"]
    assert providers["bad"]["healthy"] is False
    assert "500" in providers["bad"]["error"]

    assert table[0] == 0
    rows = [line.split() for line in table[1].splitlines()]
    assert rows[0][:2] == ["PROVIDER", "MODEL"]
    assert [row[:3] for row in rows if row[0] == "good"] == [
        ["good", "alpha", "ok"], ["good", "org/beta", "ok"]]
    assert [row[0] for row in rows[1:]].count("bad") == 1

    assert check_mixed[0] == 1
    assert "bad" in check_mixed[1]
    assert check_healthy[0] == 0
    assert "good" in check_healthy[1]
