"""The middlewares, in the order ``app.py`` lists them (outermost first).

``error_middleware`` is outermost: whatever fails below it, a handler's ``GatewayError``
or aiohttp's own ``HTTPException`` (unknown route, wrong method, body too large), leaves
as one OpenAI-shaped error. Then ``context_middleware`` starts the overhead clock and
names the request, and ``auth_middleware`` finds the caller's gateway key. Limits and
metrics come after it.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.auth import OPEN_PATHS
from proxy.dispatch import Timing
from proxy.errors import (
    BodyTooLarge,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    error_json,
)
from proxy.headers import PEER, PEER_KEY
from proxy.headers import REQUEST_ID as REQUEST_ID_HEADER
from proxy.state import ADMISSION, FROM_PEER, GATEWAY_KEY, LIVE, REQUEST_ID, TIMING, WORKER

log = logging.getLogger("proxy.errors")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,200}$")


def error_response(error: GatewayError) -> web.Response:
    return web.Response(status=error.status, body=error_json(error),
                        content_type="application/json", headers=error.headers())


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as error:
        if error.status >= 500:
            # raw_path: as sent, so a client cannot forge log lines with %0A.
            request.app[LIVE].shared.failures(f"{request.method} {request.raw_path}",
                                              request.get(REQUEST_ID, "-"), error)
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http_exception(request, exc))
    except ConnectionError:
        raise  # the client went away: there is nobody to answer
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(GatewayError("The gateway failed to handle the request."))


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> GatewayError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return BodyTooLarge(request.app[LIVE].gateway.config.server.max_body_bytes)
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(f"No route for {request.method} {request.path}.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}.")
    if exc.status < 500:
        return InvalidRequest(exc.reason, code=f"http_{exc.status}")
    return GatewayError(exc.reason)


_ID_PREFIX = uuid.uuid4().hex[:16]  # per process; with the counter, unique per request
_id_counter = itertools.count(1)


def _new_id() -> str:
    """A request id: a random per-process prefix and a counter (a uuid4 per request
    showed in the profile; uniqueness is what matters, not unpredictability)."""
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


@web.middleware
async def context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Start the clock for ``X-Gateway-Overhead-Ms``, and name the request: the client's
    ``X-Request-ID`` when it is sane, else a new one. The id goes upstream
    (``handlers``) and back to the client (``stamp_response``). One middleware for both:
    each layer costs on every request."""
    request[TIMING] = Timing(time.perf_counter())
    given = request.headers.get("X-Request-ID", "")
    request[REQUEST_ID] = given if given and _VALID_REQUEST_ID.match(given) else _new_id()
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With gateway keys configured, every request but liveness and health presents
    one; the key found is stored under ``GATEWAY_KEY`` for the handlers. A request a
    peer worker forwarded (``peers.py``), proven by its ``X-Gateway-Peer``, was
    authenticated there: it names its key instead, and is marked ``FROM_PEER``."""
    if request.path in OPEN_PATHS:
        return await handler(request)
    keyring = request.app[LIVE].gateway.keyring
    headers = request.headers
    named = headers.get(PEER_KEY, "")
    if PEER in headers and request.app[WORKER].is_peer(
            headers[PEER], headers.get(REQUEST_ID_HEADER, ""), named):
        request[FROM_PEER] = True
        if not keyring.open:  # no name: the peer had no keys (a reload in between)
            request[GATEWAY_KEY] = (keyring.named(named) if named
                                    else keyring.authenticate(headers.get("Authorization")))
    elif not keyring.open:
        request[GATEWAY_KEY] = keyring.authenticate(headers.get("Authorization"))
    return await handler(request)


async def stamp_response(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: every answer, streamed or not, carries the request
    id and the time the gateway itself spent on it before the first byte (excluding
    the wait for the upstream), so users see the overhead on their own traffic."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-ID"] = request_id
    admission = request.get(ADMISSION)
    if admission is not None:
        response.headers.update(admission.headers)
    timing = request.get(TIMING)
    if timing is not None:
        response.headers["X-Gateway-Overhead-Ms"] = f"{timing.overhead_ms():.3f}"
