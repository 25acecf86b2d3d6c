"""``GET /health``'s ``last_error`` (issue #2: "every provider checked in parallel
(status, latency, model count, last error)"): a provider that failed and then recovered
is healthy again, with no current ``error``, but still reports what went wrong last.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import MakeConfig, StartGateway, StartUpstream


async def _health(gateway: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
            session.get(f"{gateway}/health") as response:
        return response.status, {p["name"]: p for p in (await response.json())["providers"]}


async def test_recovered_provider_is_healthy_and_keeps_its_last_error(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    state = {"status": 503}

    async def list_models(request: web.Request) -> web.Response:
        if state["status"] != 200:
            return web.json_response({"error": {"message": "warming up"}},
                                     status=state["status"])
        return web.json_response({"object": "list", "data": [
            {"id": "m1", "object": "model", "created": 1, "owned_by": "x"}]})

    app = web.Application()
    app.router.add_get("/v1/models", list_models)
    async def steady_models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "s"}]})

    steady = web.Application()
    steady.router.add_get("/v1/models", steady_models)
    providers = [
        {"name": "flaky", "type": "openai_compat", "base_url": f"{await start_upstream(app)}/v1"},
        {"name": "steady", "type": "openai_compat",
         "base_url": f"{await start_upstream(steady)}/v1"},
    ]
    gateway = await start_gateway(make_config(providers, health_cache_ttl=0))

    status, before = await _health(gateway)
    assert status == 200
    assert before["flaky"]["status"] == "unhealthy"
    assert "503" in before["flaky"]["error"]
    assert before["flaky"]["last_error"] == before["flaky"]["error"]
    assert (before["steady"]["error"], before["steady"]["last_error"]) == (None, None)

    state["status"] = 200
    status, after = await _health(gateway)
    assert status == 200
    assert (after["flaky"]["status"], after["flaky"]["models"]) == ("healthy", 1)
    assert after["flaky"]["error"] is None
    assert after["flaky"]["last_error"] == before["flaky"]["error"]
    assert (after["steady"]["error"], after["steady"]["last_error"]) == (None, None)
