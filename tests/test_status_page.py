"""The status page ``GET /ui`` in a real headless Chromium (``bench/cdp.py``): a real
gateway and upstream on loopback, known traffic, then the rendered page must show that
traffic's numbers. And its protection: with gateway keys the page loads but shows
nothing until an admin key is typed in; ``/ui/stats`` refuses any other key.

Chromium is required, not optional: ``.ci/run`` installs Debian's ``chromium``, and a
machine without it fails here with the command to install it (a skip would let CI pass
without ever running the page)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bench.cdp import Page, chromium, find_chromium
from proxy.config.keys import hash_secret
from tests.conftest import MakeConfig, StartFake, StartGateway

ADMIN, APP = "sk-gw-admin-secret-1", "sk-gw-app-secret-2"
KEYS = {"keys": [{"name": "ops", "sha256": hash_secret(ADMIN), "admin": True},
                 {"name": "app", "sha256": hash_secret(APP)}]}
DASHBOARD = "document.body.dataset.state === 'ready' && Number(document.body.dataset.updates)"


def browser_binary() -> str:
    binary = find_chromium()
    if binary is None:
        pytest.fail("chromium is not installed: DEBIAN_FRONTEND=noninteractive apt-get "
                    "install -y --no-install-recommends chromium (.ci/run does)")
    return binary


async def gateway(start_fake: StartFake, start_gateway: StartGateway,
                  make_config: MakeConfig, **raw: Any) -> str:
    upstream = await start_fake(pieces=("hello",), usage={
        "prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
    return await start_gateway(make_config([upstream.provider("local-up")], **raw))


async def send_known_traffic(url: str, key: str | None = None) -> None:
    """7 chats (5 distinct, so 2 cache hits) and one 404 for an unknown model."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(headers=headers) as session:
        for n in (0, 1, 2, 3, 4, 0, 1):
            chat = {"model": "m", "temperature": 0,
                    "messages": [{"role": "user", "content": f"question {n}"}]}
            async with session.post(f"{url}/v1/chat/completions", json=chat) as response:
                assert response.status == 200, await response.text()
        async with session.post(f"{url}/v1/chat/completions", json={
                "model": "nope", "messages": []}) as response:
            assert response.status == 404


async def text(page: Page, selector: str) -> str:
    value = await page.evaluate(f"document.querySelector({selector!r}).textContent")
    return str(value).strip()


async def provider_cells(page: Page, name: str) -> list[str]:
    cells = await page.evaluate(
        f"[...document.querySelector('tr[data-provider=\"{name}\"]').cells]"
        ".map(c => c.textContent.trim())")
    assert isinstance(cells, list)
    return [str(c) for c in cells]


async def test_the_page_shows_the_traffic_it_was_sent(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    tmp_path: Path,
) -> None:
    binary = browser_binary()
    url = await gateway(start_fake, start_gateway, make_config)
    await send_known_traffic(url)
    async with chromium(tmp_path / "profile", binary) as page:
        await page.goto(f"{url}/ui")
        await page.wait_for(f"{DASHBOARD} >= 1")
        assert await text(page, "#requests") == "8"
        assert await text(page, "#cache") == "2 hits · 5 misses"
        assert await text(page, "#cache-rate") == "29\u00a0%"
        assert (await text(page, "#errors")).startswith("1 4xx (13\u00a0%) · 0 5xx")
        assert await text(page, "#overall") == "ok"
        cells = await provider_cells(page, "local-up")
        assert cells[:3] == ["local-up (openai_compat)", "healthy", "closed"]
        assert cells[6:8] == ["7", "0"]  # requests routed there, 5xx among them
        assert (await text(page, "#p50")).endswith("ms")
        # The second refresh has a previous sample: live rates replace "measuring".
        await page.wait_for(f"{DASHBOARD} >= 2", within=10)
        assert (await text(page, "#window")).startswith("over the last")
        assert await text(page, "#requests") == "8"  # the page's own polls do not count
        png = await page.screenshot()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


async def test_with_keys_the_page_needs_an_admin_key(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
    tmp_path: Path,
) -> None:
    binary = browser_binary()
    url = await gateway(start_fake, start_gateway, make_config, auth=KEYS)
    await send_known_traffic(url, APP)
    async with chromium(tmp_path / "profile", binary) as page:
        await page.goto(f"{url}/ui")
        await page.wait_for("document.body.dataset.state === 'key'")
        assert await page.evaluate("document.getElementById('dashboard').hidden") is True
        assert await text(page, "#requests") == "\u2013"  # nothing was shown
        await page.type_into("#key", APP)  # a key, but not an admin key
        await page.evaluate("document.querySelector('#key-form button').click()")
        await page.wait_for("document.getElementById('login-error').textContent")
        assert "admin" in await text(page, "#login-error")
        assert await page.evaluate("document.body.dataset.state") == "key"
        await page.type_into("#key", ADMIN)
        await page.evaluate("document.querySelector('#key-form button').click()")
        await page.wait_for(f"{DASHBOARD} >= 1")
        assert await text(page, "#requests") == "8"
        assert await page.evaluate("location.href") == f"{url}/ui"  # no key in any URL
        assert await page.evaluate("document.getElementById('key').value") == ""
        await page.evaluate("document.getElementById('forget').click()")
        await page.wait_for("document.body.dataset.state === 'key'")


async def test_stats_need_an_admin_key_and_the_page_carries_a_strict_policy(
    start_fake: StartFake, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    url = await gateway(start_fake, start_gateway, make_config, auth=KEYS)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/ui") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            assert "Gateway status" in await response.text()
            policy = response.headers["Content-Security-Policy"]
            assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy
            assert response.headers["Cache-Control"] == "no-store"
        expected = {None: (401, "invalid_api_key"), APP: (403, "admin_key_required")}
        for key, (status, code) in expected.items():
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with session.get(f"{url}/ui/stats", headers=headers) as response:
                assert response.status == status
                assert (await response.json())["error"]["code"] == code
        async with session.get(f"{url}/ui/stats", headers={
                "Authorization": f"Bearer {ADMIN}"}) as response:
            assert response.status == 200
            stats = await response.json()
    assert stats["totals"]["requests"] == 0 and stats["live"] is None
    assert [p["name"] for p in stats["providers"]] == ["local-up"]
    assert ADMIN not in str(stats) and APP not in str(stats)
