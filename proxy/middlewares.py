"""The middlewares, in the order ``app.py`` lists them (outermost first); ``core.py``
builds each route's chain of them once, inside its own step that names the request and
keeps its ``Record``.

``error_middleware`` turns whatever fails below, a handler's ``GatewayError`` or
aiohttp's own ``HTTPException`` (unknown route, wrong method, body too large), into one
OpenAI-shaped error, so the record sees the status the client got. Then
``auth_middleware`` finds the caller's gateway key.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

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
from proxy.state import (
    FROM_PEER,
    GATEWAY_KEY,
    LIVE,
    RECORD,
    REQUEST_ID,
    WORKER,
)
from proxy.whole import WholeResponse

log = logging.getLogger("proxy.errors")


def error_response(error: GatewayError) -> web.Response:
    headers = CIMultiDict(error.headers())
    headers["Content-Type"] = "application/json"
    return WholeResponse(error.status, None, headers, error_json(error))


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


async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With gateway keys configured, every request but liveness and health presents
    one; the key found is stored under ``GATEWAY_KEY`` for the handlers. A request a
    peer worker forwarded (``sharing/peers.py``), proven by its ``X-Gateway-Peer``, was
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
