"""The middlewares, in the order ``app.py`` lists them (outermost first).

``context_middleware`` is outermost: it names the request, starts its ``Record`` (and
the overhead clock), and once the request is over, however it ended, hands the record
to the observers (access log, metrics, usage). Inside it ``error_middleware`` turns
whatever fails below, a handler's ``GatewayError`` or aiohttp's own ``HTTPException``
(unknown route, wrong method, body too large), into one OpenAI-shaped error, so the
record sees the status the client got. Then ``auth_middleware`` finds the caller's
gateway key.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.auth import OPEN_PATHS
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
from proxy.logs import CURRENT_REQUEST
from proxy.record import CLIENT_DISCONNECT, Record, endpoint_label
from proxy.state import (
    ADMISSION,
    FROM_PEER,
    GATEWAY_KEY,
    LIVE,
    METRICS,
    OBSERVERS,
    RECORD,
    REQUEST_ID,
    WORKER,
)

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
        request[RECORD].error_code = error.code
        if error.status >= 500:
            # raw_path: as sent, so a client cannot forge log lines with %0A.
            request.app[LIVE].shared.failures(f"{request.method} {request.raw_path}",
                                              request.get(REQUEST_ID, "-"), error)
        return error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        mapped = _from_http_exception(request, exc)
        request[RECORD].error_code = mapped.code
        return error_response(mapped)
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
    """Name the request (the client's ``X-Request-ID`` when it is sane, else a new one:
    it goes upstream and back to the client) and keep its :class:`Record`, handed to the
    observers when it ends. One middleware for all of it: each layer costs on every
    request."""
    given = request.headers.get("X-Request-ID", "")
    request_id = given if given and _VALID_REQUEST_ID.match(given) else _new_id()
    request[REQUEST_ID] = request_id
    named = CURRENT_REQUEST.set(request_id)  # for the lines logged meanwhile (logs.py)
    record = request[RECORD] = Record(time.perf_counter(), request.method,
                                      request_id=request_id, client=request.remote)
    metrics = request.app[METRICS]
    metrics.in_flight += 1
    try:
        response = await handler(request)
    except (asyncio.CancelledError, ConnectionError):
        record.ended, record.status = CLIENT_DISCONNECT, 499  # nginx's code for it
        raise
    except web.HTTPException as exc:  # a redirect, say (errors were answered below)
        record.status = exc.status
        raise
    else:
        record.status = response.status
        if record.first_byte is None:  # a whole answer: its head goes out right after
            record.first_byte = time.perf_counter()
        record.bytes_out = (response.body_length if response.prepared
                            else response.content_length or 0)
    finally:
        metrics.in_flight -= 1
        _observe(request, record)
        CURRENT_REQUEST.reset(named)
    return response


def _observe(request: web.Request, record: Record) -> None:
    record.finished = time.perf_counter()
    if not record.path:  # the handler did not name it (it never ran, say)
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else "other"
        record.path = (endpoint_label(request.path.removeprefix("/v1/"))
                       if canonical == "/v1/{tail}" else canonical)
    request.app[OBSERVERS].ended(record)


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
        record = request[RECORD]
        record.forwarded = request[FROM_PEER] = True
        # The peer's named key is the caller's even when this worker has none any more
        # (a reload removing every key reached it first): its caller's Authorization was
        # not forwarded, so without the name every tenant of that peer would share one
        # sharing identity.
        record.key_name = named or None
        if not keyring.open:  # no name: the peer had no keys (a reload in between)
            key = request[GATEWAY_KEY] = (
                keyring.named(named) if named
                else keyring.authenticate(headers.get("Authorization")))
            record.key_name = key.name
    elif not keyring.open:
        key = request[GATEWAY_KEY] = keyring.authenticate(headers.get("Authorization"))
        request[RECORD].key_name = key.name
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
    record = request.get(RECORD)
    if record is not None:
        response.headers["X-Gateway-Overhead-Ms"] = f"{record.overhead_ms():.3f}"
