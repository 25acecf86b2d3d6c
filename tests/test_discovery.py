"""Parallel model discovery, its cache, health endpoints and the ``models``/``check`` CLI
(issue #2, "Parallel model discovery").

The fake providers are tiny apps defined here whose ``/v1/models`` handler counts its
calls and how many of them are in flight at once (shared across providers).
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from tests.cli_helpers import run_cli
from tests.conftest import MakeConfig, StartGateway, StartUpstream
from tests.polling import until

SECRET = "sk-discovery-secret-0123456789"


@dataclass
class InFlight:
    now: int = 0
    max: int = 0


@dataclass
class Fake:
    name: str
    models: list[str]
    latency: float = 0.0
    status: int = 200
    hang: asyncio.Event | None = None  # wait for this instead of answering
    shared: InFlight = field(default_factory=InFlight)
    calls: int = 0
    auth: list[str | None] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._list)
        return app

    async def _list(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.auth.append(request.headers.get("Authorization"))
        self.shared.now += 1
        self.shared.max = max(self.shared.max, self.shared.now)
        try:
            if self.hang is not None:
                await self.hang.wait()
            await asyncio.sleep(self.latency)
        finally:
            self.shared.now -= 1
        if self.status != 200:
            return web.json_response({"error": {"message": "broken"}}, status=self.status)
        data = [{"id": m, "object": "model", "created": 1, "owned_by": "x"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    def provider(self, **extra: Any) -> dict[str, Any]:
        return {"name": self.name, "type": "openai_compat", "base_url": self.url, **extra}


async def _start(start_upstream: StartUpstream, *fakes: Fake) -> None:
    for fake in fakes:
        fake.url = f"{await start_upstream(fake.app())}/v1"


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
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    shared = InFlight()
    fakes = [Fake(f"p{i}", [f"model-{i}"], latency=0.5, shared=shared) for i in range(5)]
    await _start(start_upstream, *fakes)
    started = time.perf_counter()
    gateway = await start_gateway(make_config([f.provider() for f in fakes]))
    status, body, _ = await _get(f"{gateway}/v1/models")
    elapsed = time.perf_counter() - started
    assert status == 200
    assert sorted(m["id"] for m in body["data"]) == [f"model-{i}" for i in range(5)]
    assert "errors" not in body
    assert shared.max == 5
    assert elapsed < 1.2, f"discovery took {elapsed:.2f} s: providers were asked in series"
    assert [f.calls for f in fakes] == [1] * 5


@pytest.mark.parametrize("failure", ["http_500", "closed_port", "hangs"])
async def test_one_failing_provider_leaves_the_others_listed(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    failure: str,
) -> None:
    release = asyncio.Event()
    good = [Fake(f"good{i}", [f"model-{i}"], latency=0.3) for i in range(3)]
    bad = Fake("bad", ["never"], status=500 if failure == "http_500" else 200,
               hang=release if failure == "hangs" else None)
    await _start(start_upstream, *good, bad)
    if failure == "closed_port":
        bad.url = _closed_port_url()
    config = make_config([good[0].provider(), bad.provider(), *(g.provider() for g in good[1:])],
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
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    fake = Fake("p", ["m1", "m2"])
    await _start(start_upstream, fake)
    gateway = await start_gateway(make_config([fake.provider()]))
    first = await _get(f"{gateway}/v1/models")
    second = await _get(f"{gateway}/v1/models")
    assert [m["id"] for m in second[1]["data"]] == ["m1", "m2"]
    assert second[1] == first[1]
    assert fake.calls == 1


async def test_stale_listing_is_served_while_refreshing(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    fake = Fake("p", ["m1"], latency=0.3)
    await _start(start_upstream, fake)
    gateway = await start_gateway(make_config([fake.provider()], models_cache_ttl=0.3))
    await _get(f"{gateway}/v1/models")
    assert fake.calls == 1
    await asyncio.sleep(0.35)  # past the TTL
    fake.models = ["m1", "m2"]
    started = time.perf_counter()
    _, stale, _ = await _get(f"{gateway}/v1/models")
    assert time.perf_counter() - started < 0.2, "a stale listing waited for the refresh"
    assert [m["id"] for m in stale["data"]] == ["m1"]
    await until(lambda: fake.calls == 2, within=0.2)

    async def refreshed() -> bool:
        _, body, _ = await _get(f"{gateway}/v1/models")
        return [m["id"] for m in body["data"]] == ["m1", "m2"]

    await until(refreshed)


async def test_healthz_never_touches_upstreams(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    fake = Fake("p", ["m1"])
    await _start(start_upstream, fake)
    gateway = await start_gateway(make_config([fake.provider()], health_cache_ttl=0))
    await until(lambda: fake.calls == 1 and fake.shared.now == 0)  # start-up discovery
    for _ in range(3):
        status, body, _ = await _get(f"{gateway}/healthz")
        assert status == 200
        assert body["status"] == "ok"
    assert fake.calls == 1


async def test_health_reports_each_provider_without_secrets(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    good, bad = Fake("good", ["m1", "m2"], latency=0.05), Fake("bad", [], status=500)
    await _start(start_upstream, good, bad)
    config = make_config([good.provider(api_key_env="GOOD_KEY"), bad.provider()],
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
    assert good.auth[0] == f"Bearer {SECRET}"
    calls = good.calls
    await _get(f"{gateway}/health")
    assert good.calls == calls, "/health probed again within health_cache_ttl"
    await asyncio.sleep(0.35)
    await _get(f"{gateway}/health")
    assert good.calls == calls + 1, "/health did not probe again after health_cache_ttl"


async def test_health_is_503_when_every_provider_fails(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    bad = Fake("bad", [], status=500)
    await _start(start_upstream, bad)
    gone = {"name": "gone", "type": "openai_compat", "base_url": _closed_port_url()}
    gateway = await start_gateway(make_config([bad.provider(), gone]))
    status, body, _ = await _get(f"{gateway}/health")
    assert status == 503
    assert [(p["name"], p["status"]) for p in body["providers"]] == [
        ("bad", "unhealthy"), ("gone", "unhealthy")]
    assert all(p["error"] for p in body["providers"])


def _write_config(path: Path, providers: list[dict[str, Any]]) -> str:
    path.write_text(yaml.safe_dump({"providers": providers, "timeouts": {"discovery": 2}}))
    return str(path)


async def test_cli_models_and_check(start_upstream: StartUpstream, tmp_path: Path) -> None:
    good, bad = Fake("good", ["alpha", "org/beta"]), Fake("bad", [], status=500)
    await _start(start_upstream, good, bad)
    mixed = _write_config(tmp_path / "mixed.yaml", [good.provider(), bad.provider()])
    healthy = _write_config(tmp_path / "healthy.yaml", [good.provider()])
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
