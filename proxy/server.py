"""Running a worker: the app on a socket, until SIGINT or SIGTERM.

``running()`` is what the CLI and the tests both use, so tests exercise the same runner
settings as production: handler cancellation on (a client that disconnects cancels its
handler and so its upstream request) and no access log on the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from proxy.app import build_app
from proxy.config import Config, with_demo_provider

log = logging.getLogger("proxy.server")


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[str]:
    """Serve ``config`` on its host and port (0 picks a free one); yields the base URL."""
    runner = web.AppRunner(build_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{_url_host(host)}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def demo_upstream_if_needed(config: Config) -> AsyncIterator[Config]:
    """With no provider configured, serve from the bundled mock upstream (``bench/``),
    so the gateway answers chat completions offline, out of the box."""
    if config.providers:
        yield config
        return
    from bench.upstream import MockOptions, create_app  # noqa: PLC0415 - demo mode only

    runner = web.AppRunner(create_app(MockOptions(interval=0.05)), access_log=None,
                           handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield with_demo_provider(config, f"http://127.0.0.1:{port}/v1")
    finally:
        await runner.cleanup()


async def serve(given: Config) -> None:
    async with demo_upstream_if_needed(given) as config, running(config) as url:
        names = ", ".join(f"{p.name} ({p.type})" for p in config.providers)
        log.info("proxy listening on %s; providers: %s; config: %s", url, names,
                 config.source)
        if config.providers[0].name == "mock" and config.source.startswith("defaults"):
            log.info("no provider configured: answering from the bundled mock upstream; "
                     "set OPENAI_API_KEY, use --upstream URL or a config file for real models")
        await _until_stopped()
    log.info("proxy stopped")


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
