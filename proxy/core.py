"""The request's entry (issue 11): aiohttp's low-level server hands every parsed request
to :class:`Core`, which picks its route, starts its record and runs the route's chain.

aiohttp's ``Application._handle`` did this per request with a regex walk over the
resources, a fresh match info, one wrapper per middleware (``_fix_request_current_app``)
and an ``on_response_prepare`` signal: about a tenth of a request's CPU on the hot path
(issue 11's profile). Here:

* the route table is a dict of exact paths and a short list of prefixes (``/v1/``), read
  once at start from ``app.ROUTES``; a path with an escape or a dot segment is matched in
  the form aiohttp would match it (decoded, ``%2F`` kept);
* each route's middleware chain (``app.MIDDLEWARES``, outermost first) is built once;
* what ``context_middleware`` did is inline: the request id (the client's
  ``X-Request-ID`` when it is sane), the :class:`~proxy.record.Record`, the in-flight
  gauge, and the record handed to the observers however the request ended;
* an answer's head is stamped (``Record.stamp``: request id, rate-limit headers, overhead)
  here for a whole answer, and by ``streaming.send_answer`` for one it streams.

The app stays the holder of state (``request.app``, ``cleanup_ctx``): handlers see a
``web.Request`` whose match info is the route's, built once (the models route, the only
one with a parameter, builds its own).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_urldispatcher import (
    AbstractRoute,
    PlainResource,
    ResourceRoute,
    UrlMappingMatchInfo,
)

from proxy.observe.logs import CURRENT_REQUEST
from proxy.observe.metrics import Metrics
from proxy.observe.observers import Observers
from proxy.record import CLIENT_DISCONNECT, Record, endpoint_label
from proxy.state import RECORD, REQUEST_ID

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,200}$")
_ID_PREFIX = uuid.uuid4().hex[:16]  # per process; with the counter, unique per request
_id_counter = itertools.count(1)
_GET = frozenset({"GET", "HEAD"})


def new_request_id() -> str:
    """A request id: a random per-process prefix and a counter (a uuid4 per request
    showed in the profile; uniqueness is what matters, not unpredictability)."""
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One line of ``app.ROUTES``. ``path`` is exact, or with ``prefix`` the start of
    the paths it takes (a longer one); ``param`` names that rest in ``match_info``.
    ``methods`` None takes every method."""

    path: str
    handler: Handler
    methods: frozenset[str] | None = _GET
    prefix: bool = False
    param: str | None = None
    # The record's route label (metrics, logs); None: the endpoint's under /v1/.
    label: str | None = ""

    def takes(self, method: str) -> bool:
        return self.methods is None or method in self.methods


class Route:
    """A :class:`RouteSpec` ready to serve: its chain and its frozen match info."""

    __slots__ = ("chain", "label", "match", "param", "spec")

    def __init__(self, spec: RouteSpec, app: web.Application,
                 middlewares: Sequence[Middleware]):
        self.spec = spec
        self.param = spec.param
        self.label = spec.label
        if self.label == "":  # named by its path, as aiohttp's canonical form
            self.label = spec.path + (f"{{{spec.param}}}" if spec.param else "")
        chain = spec.handler
        for middleware in reversed(middlewares):
            chain = partial(middleware, handler=chain)
        self.chain: Handler = chain
        self.match = _match_info({}, self._aiohttp_route(), app)

    def _aiohttp_route(self) -> ResourceRoute:
        label = self.label or ""
        resource = PlainResource(label if label.startswith("/") else self.spec.path)
        return ResourceRoute("*", self.spec.handler, resource)

    def match_for(self, rest: str, app: web.Application) -> UrlMappingMatchInfo:
        if self.param is None:
            return self.match
        return _match_info({self.param: rest}, self.match.route, app)


def _match_info(found: dict[str, str], route: AbstractRoute, app: web.Application
                ) -> UrlMappingMatchInfo:
    match = UrlMappingMatchInfo(found, route)
    match.add_app(app)
    match.freeze()
    return match


async def _not_found(request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound()


def _not_allowed(routes: list[Route]) -> Handler:
    allowed = {method for route in routes for method in route.spec.methods or ()}

    async def not_allowed(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    return not_allowed


class Core:
    """The request handler of every client connection (``http_safety.GuardedServer``)."""

    def __init__(self, app: web.Application, routes: Sequence[RouteSpec],
                 middlewares: Sequence[Middleware], metrics: Metrics, observers: Observers):
        self._app = app
        self._metrics = metrics
        self._observers = observers
        self._exact: dict[str, list[Route]] = {}
        self._prefixes: list[tuple[str, Route]] = []
        for spec in routes:
            route = Route(spec, app, middlewares)
            if spec.prefix:
                self._prefixes.append((spec.path, route))
            else:
                self._exact.setdefault(spec.path, []).append(route)
        self._refusals = {path: self._refusal(_not_allowed(exact), middlewares)
                          for path, exact in self._exact.items()}
        self._not_found = self._refusal(_not_found, middlewares)

    def __repr__(self) -> str:
        return f"<Core routes={sum(map(len, self._exact.values())) + len(self._prefixes)}>"

    def route(self, method: str, path: str) -> tuple[Route, str]:
        """The route for ``method`` on ``path`` (its matchable form), and the rest of the
        path after a prefix route's. An exact path with no route for the method is
        a 405 unless a prefix takes it; no route at all, a 404."""
        exact = self._exact.get(path)
        if exact is not None:
            for route in exact:
                if route.spec.takes(method):
                    return route, ""
        for prefix, route in self._prefixes:
            if path.startswith(prefix) and len(path) > len(prefix) and route.spec.takes(method):
                return route, path[len(prefix):]
        if exact is not None:
            return self._refusals[path], ""
        return self._not_found, ""

    def _refusal(self, handler: Handler, middlewares: Sequence[Middleware]) -> Route:
        return Route(RouteSpec("", handler, None, label="other"), self._app, middlewares)

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        raw = request.raw_path
        path = raw.partition("?")[0] if "?" in raw else raw
        if "%" in path or "/." in path:
            path = request.rel_url.path_safe  # what aiohttp's router matched
        route, rest = self.route(request.method, path)
        request._match_info = route.match_for(rest, self._app)
        given = request.headers.get("X-Request-ID", "")
        request_id = given if given and _VALID_REQUEST_ID.match(given) else new_request_id()
        request[REQUEST_ID] = request_id
        named = CURRENT_REQUEST.set(request_id)  # for the lines logged meanwhile (observe/logs.py)
        record = request[RECORD] = Record(time.perf_counter(), request.method,
                                          path=route.label or "", request_id=request_id,
                                          client=request.remote)
        self._metrics.in_flight += 1
        try:
            if hdrs.EXPECT in request.headers:
                await _expect(request)
            response = await route.chain(request)
        except (asyncio.CancelledError, ConnectionError):
            record.ended, record.status = CLIENT_DISCONNECT, 499  # nginx's code for it
            # Written before the cut (some may still have been in the socket buffers: at
            # most that many reached the client).
            record.bytes_out = request.writer.output_size - record.head_bytes
            raise
        except web.HTTPException as exc:  # a redirect, say (errors were answered below)
            record.status = exc.status
            raise
        else:
            record.status = response.status
            if not response.prepared:  # a whole answer: its head goes out right after
                record.stamp(response.headers)
                if record.first_byte is None:
                    record.first_byte = time.perf_counter()
            record.bytes_out = (response.body_length - record.head_bytes if response.prepared
                                else response.content_length or 0)
        finally:
            self._metrics.in_flight -= 1
            self._end(request, record)
            CURRENT_REQUEST.reset(named)
        return response

    def _end(self, request: web.Request, record: Record) -> None:
        record.finished = time.perf_counter()
        if not record.path:  # a /v1/ request its handler did not name (a 401, say)
            record.path = endpoint_label(request.path.removeprefix("/v1/"))
        self._observers.ended(record)


async def _expect(request: web.Request) -> None:
    """``Expect: 100-continue`` (curl sends it for bodies over 1 KiB): the go-ahead, as
    aiohttp's router gives it; any other expectation is refused (417)."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return
    if expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0
    await request.writer.drain()


CORE = web.AppKey("core", Core)
