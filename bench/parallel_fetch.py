"""Model discovery from slow providers: one after another vs the gateway (issue #3).

Five fake providers each take 0.5 s to answer ``GET /v1/models``. Three figures:

* ``sequential``: one ``aiohttp.ClientSession`` asks them one after another, the way a
  naive gateway walks its provider list (expected: 5 x 0.5 s = 2.5 s);
* ``parallel``: the gateway's own ``ModelCatalog.refresh()`` on a fresh catalog and a
  fresh ``UpstreamClient`` (new connections, like the sequential run), the exact code
  behind ``/v1/models``, ``/health`` and ``proxy models`` (target: <= 0.6 s);
* ``gateway``: end to end, from starting a gateway (``proxy.server.serve.running``) to its
  first ``GET /v1/models`` answer. The gateway starts a discovery in the background at
  start-up and the request joins it, so this is what the first client of a fresh worker
  waits, start-up included; timing only the request would hide the part of the discovery
  that ran before it, so it is not measured that way.

The ratio reported is sequential / parallel. Everything runs in-process on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web

from proxy.config.loader import Config, config_from_dict
from proxy.discovery import ModelCatalog
from proxy.providers import PROVIDER_TYPES, build_provider
from proxy.server.serve import running
from proxy.tasks import BackgroundTasks
from proxy.upstream.client import UpstreamClient


def slow_provider(name: str, delay: float) -> web.Application:
    """An OpenAI-compatible provider whose model listing takes ``delay`` seconds."""
    body = orjson.dumps({"object": "list", "data": [
        {"id": f"{name}-model", "object": "model", "created": 0, "owned_by": name}]})

    async def list_models(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/models", list_models)
    return app


async def start_providers(stack: AsyncExitStack, count: int, delay: float) -> list[str]:
    """Serve ``count`` slow providers on free ports; returns their base URLs (with /v1)."""
    urls = []
    for index in range(count):
        runner = web.AppRunner(slow_provider(f"p{index}", delay), access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}/v1")
    return urls


async def sequential(urls: list[str]) -> float:
    """Seconds to list every provider's models one after another."""
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.get(f"{url}/models") as answer:
                answer.raise_for_status()
                await answer.read()
    return time.perf_counter() - started


async def parallel(config: Config) -> float:
    """Seconds for one ``ModelCatalog.refresh()``, built the way ``proxy models`` builds it."""
    client, tasks = UpstreamClient(config), BackgroundTasks()
    await client.start()
    try:
        catalog = ModelCatalog([build_provider(p) for p in config.providers], client, tasks,
                               ttl=config.models_cache_ttl, timeout=config.timeouts.discovery)
        started = time.perf_counter()
        snapshot = await catalog.refresh()
        elapsed = time.perf_counter() - started
    finally:
        await tasks.close()
        await client.close()
    failed = [s.provider for s in snapshot.statuses if not s.healthy]
    if failed or len(snapshot.statuses) != len(config.providers):
        raise RuntimeError(f"discovery did not reach every provider (failed: {failed})")
    return elapsed


async def gateway(config: Config) -> float:
    """Seconds from starting a gateway to its first complete ``GET /v1/models`` answer."""
    started = time.perf_counter()
    async with running(config) as url, aiohttp.ClientSession() as session, \
            session.get(f"{url}/v1/models") as answer:
        answer.raise_for_status()
        models = (await answer.json())["data"]
    elapsed = time.perf_counter() - started
    if len(models) < len(config.providers):
        raise RuntimeError(f"gateway listed {len(models)} models, expected one per provider")
    return elapsed


async def measure(count: int, delay: float) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        urls = await start_providers(stack, count, delay)
        raw = {"server": {"host": "127.0.0.1", "port": 0}, "providers": [
            {"name": f"p{i}", "type": "openai_compat", "base_url": url}
            for i, url in enumerate(urls)]}
        config = config_from_dict(raw, {}, PROVIDER_TYPES.keys())
        steps: dict[str, Callable[[], Awaitable[float]]] = {
            "sequential": lambda: sequential(urls), "parallel": lambda: parallel(config),
            "gateway": lambda: gateway(config)}
        seconds = {name: round(await step(), 3) for name, step in steps.items()}
    return {"providers": count, "delay_s": delay, "seconds": seconds,
            "ratio": round(seconds["sequential"] / seconds["parallel"], 2),
            "target_met": seconds["parallel"] <= 0.6 * delay / 0.5}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.parallel_fetch",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--providers", type=int, default=5, choices=range(1, 51),
                        metavar="1-50")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds per listing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 0 <= args.delay <= 10:
        parser.error("--delay must be in [0, 10] s")
    report = uvloop.run(asyncio.wait_for(measure(args.providers, args.delay),
                                         timeout=args.providers * args.delay * 3 + 30))
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return
    s = report["seconds"]
    print(f"model discovery, {args.providers} providers x {args.delay:g} s each:\n"
          f"| sequential (aiohttp, one by one) | {s['sequential']:.3f} s |\n"
          f"| parallel (ModelCatalog.refresh) | {s['parallel']:.3f} s |\n"
          f"| gateway start -> first /v1/models | {s['gateway']:.3f} s |\n"
          f"ratio sequential/parallel: {report['ratio']:.2f}x; "
          f"target parallel <= 0.6 s: {'met' if report['target_met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
