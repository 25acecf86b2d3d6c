"""aiohttp's low-level ``web.Server`` answering every request with a constant chat
completion (``bench.static_answer.BODY``, the static upstream's bytes): no proxying.

Why it is in bench/: it is the ceiling of the stack the gateway runs on (uvloop, aiohttp's
HTTP parser and response writer, one handler coroutine per request, no router, no
application), measured by ``bench/compare.py`` as ``hello_server`` under the same load
generator and pinning as the proxies; issue 11 asks the gateway for >= 50 % of it. The
handler reads the request body as any chat handler must (aiohttp would drain an unread
body after the handler anyway, on a keep-alive connection).

    python -m bench.hello_server --port 8083
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import web
from aiohttp.web_request import BaseRequest

from bench.static_answer import BODY, CONTENT_TYPE

HEADERS = {"Content-Type": CONTENT_TYPE}


async def answer(request: BaseRequest) -> web.Response:
    """Every method and path: 200 and the constant chat completion."""
    await request.read()
    return web.Response(body=BODY, headers=HEADERS)


async def serve(host: str, port: int) -> None:
    """Listen until cancelled; prints one line once listening (as the naive proxy does)."""
    runner = web.ServerRunner(web.Server(answer, handler_cancellation=True, access_log=None))
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"hello server listening on http://{host}:{port}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hello_server",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8083)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
