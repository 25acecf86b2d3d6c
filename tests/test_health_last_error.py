"""``GET /health``'s ``last_error`` (issue #2: "every provider checked in parallel
(status, latency, model count, last error)"): a provider that failed and then recovered
is healthy again, with no current ``error``, but still reports what went wrong last.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.conftest import MakeConfig, StartFake, StartGateway


async def _health(gateway: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
            session.get(f"{gateway}/health") as response:
        return response.status, {p["name"]: p for p in (await response.json())["providers"]}


async def test_recovered_provider_is_healthy_and_keeps_its_last_error(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    flaky, steady = await start_fake(("m1",)), await start_fake(("s",))
    flaky.models.status = 503  # warming up
    providers = [flaky.provider("flaky", discover=True), steady.provider("steady", discover=True)]
    gateway = await start_gateway(make_config(providers, health_cache_ttl=0))

    status, before = await _health(gateway)
    assert status == 200
    assert before["flaky"]["status"] == "unhealthy"
    assert "503" in before["flaky"]["error"]
    assert before["flaky"]["last_error"] == before["flaky"]["error"]
    assert (before["steady"]["error"], before["steady"]["last_error"]) == (None, None)

    flaky.models.status = 200
    status, after = await _health(gateway)
    assert status == 200
    assert (after["flaky"]["status"], after["flaky"]["models"]) == ("healthy", 1)
    assert after["flaky"]["error"] is None
    assert after["flaky"]["last_error"] == before["flaky"]["error"]
    assert (after["steady"]["error"], after["steady"]["last_error"]) == (None, None)
