"""``/metrics`` is gzip'ed for a scraper that accepts it (Prometheus sends
``Accept-Encoding: gzip``), as the gateway's other large answers are, and plain for one
that does not; with compression off, plain for everyone."""

from __future__ import annotations

import gzip

import aiohttp

from tests.conftest import StartLive


async def _scrape(url: str, accept: str | None) -> tuple[aiohttp.ClientResponse, bytes]:
    headers = {"Accept-Encoding": accept} if accept is not None else {}
    async with (aiohttp.ClientSession(auto_decompress=False) as session,
                session.get(f"{url}/metrics", headers=headers) as response):
        return response, await response.read()


async def test_metrics_are_gzipped_for_a_scraper_that_accepts_it(
    live_gateway: StartLive,
) -> None:
    gateway = await live_gateway()
    zipped, body = await _scrape(gateway.url, "gzip")
    assert zipped.status == 200
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in zipped.headers["Vary"]
    text = gzip.decompress(body)
    assert b"# HELP gateway_" in text
    plain, raw = await _scrape(gateway.url, "identity")
    assert "Content-Encoding" not in plain.headers
    assert plain.headers["Content-Type"].startswith("text/plain")
    assert len(body) * 3 < len(raw)  # worth it: the text is repetitive
    assert raw.split(b"\n")[0] == text.split(b"\n")[0]


async def test_metrics_stay_plain_with_compression_off(live_gateway: StartLive) -> None:
    gateway = await live_gateway(compression={"enabled": False})
    response, body = await _scrape(gateway.url, "gzip")
    assert response.status == 200 and "Content-Encoding" not in response.headers
    assert b"gateway_" in body
