"""The floor under the gateway: a bare ``web.Application`` whose one handler relays each
request through the gateway's own upstream client (``proxy.upstream.client.UpstreamClient``),
with nothing else: no routing, no header rules, no request id, no limits, no dedup.

Why it is in bench/: it tells how much of the gateway's time per request is aiohttp's
web layer plus the upstream hop (this floor) and how much is the gateway's features (the
difference), measured in the same run by ``bench/compare.py``. No gateway built on
``web.Application`` and this client can be faster than this on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import uvloop
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.config.loader import Config
from proxy.upstream.client import UpstreamClient
from proxy.upstream.protocol import UpstreamRequest

CLIENT = web.AppKey("client", UpstreamClient)
UPSTREAM = web.AppKey("upstream", str)
JSON = CIMultiDict({"Content-Type": "application/json"})


async def relay(request: web.Request) -> web.Response:
    body = await request.read()
    client = request.app[CLIENT]
    url = URL(request.app[UPSTREAM] + request.raw_path, encoded=True)
    connection, response = await client.send(
        UpstreamRequest(request.method, url, JSON.copy(), body), "floor")
    parts = []
    try:
        while chunk := await response.content.readany():
            parts.append(chunk)
    except BaseException:
        client.done(connection, reuse=False)
        raise
    client.done(connection, reuse=True)
    return web.Response(status=response.status, body=b"".join(parts),
                        content_type=response.headers.get("Content-Type", "application/json"))


def build(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app[CLIENT] = UpstreamClient(Config())

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await app[CLIENT].start()
        yield
        await app[CLIENT].close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


async def serve(upstream: str, host: str, port: int) -> None:
    runner = web.AppRunner(build(upstream), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_proxy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:9000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8082)
    args = parser.parse_args()
    uvloop.run(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
