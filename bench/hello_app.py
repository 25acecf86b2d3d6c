"""``bench/hello_server.py`` through a ``web.Application`` with one POST route: the same
constant chat completion, now behind aiohttp's router, ``web.Request`` and app runner.

Why it is in bench/: ``hello_app`` minus ``hello_server`` in ``bench/compare.py``'s table
is what aiohttp's application layer costs per request, the layer the gateway left for
the low-level server (issue 11). Only ``POST /v1/chat/completions`` answers (so the
readiness check POSTs too); any other path is the router's 404, any other method its 405.

    python -m bench.hello_app --port 8084
"""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import web

from bench.static_answer import BODY, CONTENT_TYPE

CHAT = "/v1/chat/completions"
HEADERS = {"Content-Type": CONTENT_TYPE}


async def answer(request: web.Request) -> web.Response:
    """200 and the constant chat completion, after reading the body (as a handler must)."""
    await request.read()
    return web.Response(body=BODY, headers=HEADERS)


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post(CHAT, answer)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hello_app",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8084)
    args = parser.parse_args(argv)
    web.run_app(create_app(), host=args.host, port=args.port, access_log=None,
                print=lambda *_: print(f"hello app listening on http://{args.host}:"
                                       f"{args.port}", flush=True),
                handler_cancellation=True, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
