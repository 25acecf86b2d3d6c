"""A fast, scriptable mock of an OpenAI-compatible upstream: app wiring and command line.

One server, three users (STYLE.md rule 8: fakes are real code, shared by tests and bench):

* the gateway's demo mode starts it in-process so a newcomer can curl the gateway offline;
* the test suite points the gateway at it as a fake upstream;
* benchmarks use it as an upstream that must never be the bottleneck (10k+ req/s), so
  constant answers are rendered once in :func:`create_app` and per-request work is about
  one ``orjson.dumps``.

Endpoints, all under ``/v1``: ``GET models``, ``GET models/{id}``, ``POST
chat/completions``, ``POST completions``, ``POST embeddings``, ``POST responses``.
Behaviour is fixed by :class:`MockOptions`; one inference request can script itself with
headers (an invalid value is a 400):

=========================== ===========================================================
``X-Mock-Latency``          seconds to wait before the response headers
``X-Mock-Chunks``           content chunks in a streamed answer (>= 1)
``X-Mock-Interval``         seconds between streamed content chunks
``X-Mock-Status``           answer with this 4xx/5xx status and an OpenAI-shaped error
                            (429 also sends ``Retry-After: 1``)
``X-Mock-Disconnect-After`` N: abort the connection after N streamed content chunks, with
                            no ``[DONE]`` and no chunked terminator; a non-streamed request
                            is dropped before any byte of its answer
=========================== ===========================================================

Serve it with ``handler_cancellation=True`` (as :func:`main` and aiohttp's test server
do): a client that goes away then cancels its handler, and :attr:`MockStats.cancelled`
counts it.

Module map: :mod:`proxy.mock.script` (options, per-request plan, errors) ->
:mod:`proxy.mock.handlers` (endpoints) -> :mod:`proxy.mock.payloads` (JSON shapes).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Coroutine
from contextvars import ContextVar
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.mock import payloads
from proxy.mock.handlers import MockUpstream
from proxy.mock.script import MockError, MockOptions, MockStats

__all__ = [
    "OPTIONS_KEY",
    "STATS_KEY",
    "MockError",
    "MockOptions",
    "MockStats",
    "create_app",
    "main",
]

OPTIONS_KEY = web.AppKey("mock_options", MockOptions)
STATS_KEY = web.AppKey("mock_stats", MockStats)

DEFAULT_OPTIONS = MockOptions()

_MAX_BODY = 64 * 1024 * 1024
"""Benchmarks send long prompts; aiohttp's 1 MiB default would answer them 413."""

# When the current request started, for ``openai-processing-ms``. A ContextVar rather than
# request storage: ``web.RequestKey`` is newer than setup.cfg's aiohttp>=3.10 floor, and
# aiohttp 3.14 warns on plain string keys. aiohttp runs each request in its own task, with
# a copied context (aiohttp #3406), and both the middleware and ``on_response_prepare`` run
# in that task, so the value read is always the current request's.
_STARTED: ContextVar[float] = ContextVar("mock_upstream_started")


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (unknown URL, wrong method, body too large) in OpenAI's shape."""
    type_, code = payloads.status_labels(exc.status)
    where = f"({request.method} {request.path})"
    if exc.status == 404:  # worded and coded as api.openai.com words it
        message, code = f"Invalid URL {where}", None
    elif exc.text in (None, f"{exc.status}: {exc.reason}"):  # aiohttp's default text
        message = f"{exc.reason} {where}"
    else:  # a specific text, e.g. the size limit of a 413
        message = exc.text
    response = web.Response(
        status=exc.status,
        body=payloads.error_body(message, type_, code),
        content_type="application/json",
    )
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


def _tracking_middleware(stats: MockStats) -> Middleware:
    """Build the one middleware: count and time requests, render every error as JSON."""

    @web.middleware
    async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
        _STARTED.set(time.perf_counter())
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            return await handler(request)
        except MockError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _http_error(request, exc)
        except asyncio.CancelledError:
            stats.cancelled += 1
            raise
        finally:
            stats.in_flight -= 1

    return track


async def _stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Add the headers api.openai.com sends on every answer, so pass-through can be tested.

    Runs from ``on_response_prepare``, just before the headers go out, so it covers
    streamed and error answers alike; it touches only ``response.headers``.
    """
    started = _STARTED.get(None)
    elapsed = 0.0 if started is None else time.perf_counter() - started
    headers = response.headers
    headers["openai-processing-ms"] = str(int(elapsed * 1000))
    headers["x-ratelimit-limit-requests"] = "10000"
    request_id = request.headers.get("X-Request-ID")
    if request_id is not None:
        headers["X-Request-ID"] = request_id


def create_app(options: MockOptions = DEFAULT_OPTIONS) -> web.Application:
    """Build the mock upstream; ``options`` and its ``MockStats`` live under typed AppKeys."""
    stats = MockStats()
    upstream = MockUpstream(options)
    app = web.Application(middlewares=[_tracking_middleware(stats)], client_max_size=_MAX_BODY)
    app[OPTIONS_KEY] = options
    app[STATS_KEY] = stats
    app.on_response_prepare.append(_stamp_headers)
    app.router.add_get("/v1/models", upstream.list_models)
    app.router.add_get("/v1/models/{model:.+}", upstream.get_model)
    app.router.add_post("/v1/chat/completions", upstream.chat)
    app.router.add_post("/v1/completions", upstream.completions)
    app.router.add_post("/v1/embeddings", upstream.embeddings)
    app.router.add_post("/v1/responses", upstream.responses)
    return app


# --- command line -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.mock", description="Mock OpenAI-compatible upstream."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before headers")
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per stream")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between chunks")
    parser.add_argument("--error-rate", type=float, default=0.0, help="fraction answered 500")
    parser.add_argument("--models", default="mock-gpt,mock-embed", help="comma-separated ids")
    parser.add_argument("--embedding-dim", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed behind --error-rate")
    return parser


def _options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> MockOptions:
    """Options from parsed flags; a bad value exits with usage, like any argparse error."""
    try:
        return MockOptions(
            latency=args.latency,
            chunks=args.chunks,
            interval=args.interval,
            error_rate=args.error_rate,
            models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
            embedding_dim=args.embedding_dim,
            seed=args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))


async def _serve(host: str, port: int, options: MockOptions) -> None:
    """Serve until SIGINT/SIGTERM, then stop; open streams get 1 s before being cancelled."""
    runner = web.AppRunner(
        create_app(options), access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        shown = f"[{host}]" if ":" in host else host
        print(f"mock upstream listening on http://{shown}:{runner.addresses[0][1]}/v1", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when installed (it roughly doubles aiohttp's req/s), else on asyncio."""
    try:
        # Imported here so demo mode and tests, which only need create_app, never load it.
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is optional (no Windows wheels)
        asyncio.run(main)
        return
    uvloop.run(main)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point: ``python -m proxy.mock --port 9000 --latency 0.05 ...``."""
    parser = _parser()
    args = parser.parse_args(argv)
    _run(_serve(args.host, args.port, _options(parser, args)))


if __name__ == "__main__":
    main()
