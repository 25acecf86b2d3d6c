"""The baseline of issue #3: "a naive aiohttp proxy with one shared ClientSession".

Deliberately what most people would write first, so ``bench/compare.py`` shows what the
gateway's own hot path buys: read the body, send it with the one shared
``aiohttp.ClientSession`` to the same path on ``--upstream``, read the whole answer, return
it; an ``text/event-stream`` answer is relayed chunk by chunk (``iter_any``). Not naive
where that would only handicap it: uvloop, no access log, and a pool limit of 1024 like
the gateway's (aiohttp's default of 100 would queue requests at 128 connections).

    python -m bench.naive_proxy --upstream http://127.0.0.1:9000 --port 8081
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
_HOP_BY_HOP = frozenset({"host", "connection", "keep-alive", "content-length",
                         "transfer-encoding", "upgrade", "te", "trailer"})


async def proxy(request: web.Request) -> web.StreamResponse:
    """Relay one request to the same path upstream; 502 if the upstream cannot be reached."""
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
    url = request.app[UPSTREAM] + request.path_qs
    try:
        async with request.app[SESSION].request(
                request.method, url, data=body, headers=headers) as upstream:
            if upstream.content_type != "text/event-stream":
                return web.Response(body=await upstream.read(), status=upstream.status,
                                    content_type=upstream.content_type,
                                    charset=upstream.charset)
            response = web.StreamResponse(status=upstream.status)
            response.content_type = upstream.content_type
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except aiohttp.ClientError as exc:
        return web.json_response({"error": {"message": f"upstream failed: {exc!r}"}},
                                 status=502)


async def _session(app: web.Application) -> AsyncIterator[None]:
    """The one shared session, opened and closed inside the server's loop."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024)) as session:
        app[SESSION] = session
        yield


def create_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_proxy", description=__doc__)
    parser.add_argument("--upstream", required=True, help="base URL, without /v1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args(argv)
    web.run_app(create_app(args.upstream), host=args.host, port=args.port, access_log=None,
                print=lambda *_: print(f"naive proxy listening on http://{args.host}:"
                                       f"{args.port} -> {args.upstream}", flush=True),
                handler_cancellation=True, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
