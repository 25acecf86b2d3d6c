"""The gateway's error tree, and the one place it becomes an HTTP answer.

Every failure a client can see is one of these, rendered with OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}`` so SDKs raise their usual exceptions::

    GatewayError                      500 server_error
    ├── InvalidRequest                400 invalid_request_error (invalid_json, missing_model, ...)
    ├── NotFound                      404 invalid_request_error (not_found)
    │   └── ModelNotFound             404 invalid_request_error (model_not_found)
    ├── Unauthorized                  401 invalid_request_error (invalid_api_key)
    ├── ModelNotAllowed               403 invalid_request_error (model_not_allowed)
    ├── AdminKeyRequired              403 invalid_request_error (admin_key_required)
    ├── MethodNotAllowed              405 invalid_request_error (method_not_allowed)
    ├── BodyTooLarge                  413 invalid_request_error (request_too_large)
    ├── UnsupportedContentEncoding    415 invalid_request_error (unsupported_content_encoding)
    ├── MalformedRequest              400 invalid_request_error (malformed_request)    guard
    ├── BodyTimeout                   408 invalid_request_error (request_timeout)      guard
    ├── HeadersTooLarge               431 invalid_request_error (request_headers_too_large)
    ├── UnsupportedTransferEncoding   501 invalid_request_error (unsupported_transfer_encoding)
    ├── TooManyConnections            503 server_error (too_many_connections)          guard
    ├── RateLimited                   429 requests (rate_limit_exceeded)               ratelimit
    ├── LimitsUnavailable             503 server_error (rate_limit_backend_unavailable)
    ├── Overloaded                    503 server_error (gateway_overloaded)            concurrency
    ├── CircuitOpen                   503 server_error (circuit_open)                  breaker
    ├── FellBehind                    502 server_error (client_too_slow)               dedup
    ├── UsageUnavailable              503 server_error (usage_unavailable)             usage_api
    └── UpstreamError                 502 upstream_error (upstream_error)
        ├── UpstreamUnreachable       502 upstream_error (upstream_unreachable)
        ├── UpstreamProtocolError     502 upstream_error (upstream_protocol_error)
        └── UpstreamTimeout           504 upstream_error (upstream_timeout)
            └── DeadlineExceeded      504: one of a provider's deadlines (upstream/deadlines.py)
                ├── ConnectTimeout            (connect_timeout)           retried
                │   └── PoolTimeout           (connect_timeout): no free pooled connection
                ├── HeadersTimeout            (upstream_headers_timeout)
                ├── FirstTokenTimeout         (first_token_timeout)
                ├── StreamStalled             (stream_stalled)
                └── RequestTimeout            (request_timeout)

The right-hand names say which module raises an error of the client edge
(``server/guard.py``) or of a protective mechanism (``resilience/``, ``sharing/``).
An upstream's own error answer (a 429 from the provider, say) is not in this tree: it is
relayed with its status and body untouched (issue #2).
Messages never contain secrets: they are built from model and provider names, paths,
exception class names and timeout limits, never from headers, URLs or keys.
"""

from __future__ import annotations

import math
from typing import Any

import orjson


class GatewayError(Exception):
    """Base class: a failure the gateway reports to the client itself."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI-shaped error object."""
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` when load is shed, say)."""
        return {}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class UnsupportedContentEncoding(InvalidRequest):
    """A request ``Content-Encoding`` this gateway does not decode: refused, since
    routing must read the body and the upstream must get what its header says."""

    status = 415
    code = "unsupported_content_encoding"

    def __init__(self, supported: str):
        # The header's value is not echoed: messages are never built from headers.
        super().__init__(f"The request's Content-Encoding is not supported: send the body "
                         f"uncompressed or in one of: {supported}.")


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str):
        super().__init__(
            f"The model '{model}' does not exist or is not served by this gateway; "
            "GET /v1/models lists the models you can use.",
            param="model",
        )


class Unauthorized(GatewayError):
    """401: no gateway key, or one the gateway does not know. OpenAI's own type and code,
    so SDKs raise ``AuthenticationError``; the message never repeats what was sent."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="proxy"'}


class ModelNotAllowed(GatewayError):
    """403: the key is valid but may not use this model (SDKs: ``PermissionDeniedError``)."""

    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"

    def __init__(self, key: str, model: str):
        super().__init__(f"The gateway key '{key}' may not use the model '{model}'.",
                         param="model")


class AdminKeyRequired(GatewayError):
    """403: an operator's page (``/metrics``, ``/ui``) and the key is not an admin key."""

    status = 403
    type = "invalid_request_error"
    code = "admin_key_required"

    def __init__(self) -> None:
        super().__init__("This page needs an admin gateway key (auth.keys[].admin: true).")


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class BodyTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"

    def __init__(self, limit: int):
        super().__init__(f"Request body is larger than this gateway's limit of {limit} bytes.")


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class DeadlineExceeded(UpstreamTimeout):
    """A deadline of ``provider`` expired; the message names it and its limit, so the
    operator knows which ``timeouts`` key to look at."""

    key = ""  # the timeouts key, in the message
    template = ""

    def __init__(self, provider: str, limit: float):
        super().__init__(self.template.format(provider=provider, limit=limit) +
                         f" (timeouts.{self.key}).")
        self.provider = provider
        self.limit = limit


class ConnectTimeout(DeadlineExceeded):
    code = "connect_timeout"
    key = "connect"
    template = "Upstream '{provider}' did not accept a connection within {limit:g} s"


class PoolTimeout(ConnectTimeout):
    """The connect deadline passed while every connection of the worker's pool was busy
    (``pool.limit``): the upstream was never asked, so the message says so rather than
    send the operator after the upstream's network (httpx's ``PoolTimeout``)."""

    template = ("No upstream connection for '{provider}' became free within {limit:g} s: "
                "this worker's pool.limit connections were all busy")


class HeadersTimeout(DeadlineExceeded):
    code = "upstream_headers_timeout"
    key = "headers"
    template = "Upstream '{provider}' sent no response headers within {limit:g} s"


class FirstTokenTimeout(DeadlineExceeded):
    code = "first_token_timeout"
    key = "first_token"
    template = ("Upstream '{provider}' sent its response headers but no first token "
                "within {limit:g} s")


class StreamStalled(DeadlineExceeded):
    code = "stream_stalled"
    key = "read"
    template = "Upstream '{provider}' stalled: nothing received for {limit:g} s mid-answer"


class RequestTimeout(DeadlineExceeded):
    code = "request_timeout"
    key = "total"
    template = "Upstream '{provider}' did not finish its answer within {limit:g} s"


DEADLINE_ERRORS: dict[str, type[DeadlineExceeded]] = {
    cls.key: cls for cls in (ConnectTimeout, HeadersTimeout, FirstTokenTimeout,
                             StreamStalled, RequestTimeout)}

# Raised by a protective mechanism (resilience/, sharing/, observe/usage_api.py) or at the
# client edge (server/guard.py): the gateway's own refusals, each with its reason.


class CircuitOpen(GatewayError):
    """503 without an upstream call (``fail_fast`` only); SDKs retry it after
    Retry-After."""

    status = 503
    code = "circuit_open"

    def __init__(self, provider: str, retry_after: float):
        super().__init__(f"Provider '{provider}' is failing; the gateway stopped sending it "
                         f"requests for a while. Retry after {math.ceil(retry_after)} s.")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class FellBehind(GatewayError):
    status = 502
    type = "server_error"
    code = "client_too_slow"


class Overloaded(GatewayError):
    """503: a provider's limit and queue are full, or its queue deadline passed.

    ``type`` stays ``server_error``, what OpenAI sends with its own 5xx, so SDKs treat it
    as a retryable server error. ``retry_after`` is whole seconds (1 to 60) because the
    ``Retry-After`` delay-seconds form is an integer (RFC 9110 section 10.2.3).
    """

    status = 503
    code = "gateway_overloaded"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(int(self.retry_after))}


class RateLimited(GatewayError):
    """429 as OpenAI sends it (``rate_limit_exceeded``): SDKs raise ``RateLimitError`` and
    their retry logic honours ``Retry-After``."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float, limit_headers: dict[str, str]):
        super().__init__(message)
        self.retry_after = retry_after
        self.limit_headers = limit_headers

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after))),
                **self.limit_headers}


class LimitsUnavailable(GatewayError):
    """503 under ``redis.failure_policy: fail_closed`` while the shared store is down:
    no request of a limited key goes out unmetered. SDKs retry it as a server error."""

    status = 503
    code = "rate_limit_backend_unavailable"

    def __init__(self, retry_after: float):
        super().__init__("The gateway cannot check this key's rate limits right now "
                         "(its rate-limit store is unreachable); retry shortly.")
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class HeadersTooLarge(GatewayError):
    status = 431
    type = "invalid_request_error"
    code = "request_headers_too_large"

    def __init__(self, limit: int, max_headers: int):
        super().__init__(f"The request line and headers are larger than this gateway's limit "
                         f"of {limit} bytes and {max_headers} fields.")


class MalformedRequest(GatewayError):
    """400 from the parser. The message names the error class, never the bytes sent
    (a malformed header may be someone's credentials)."""

    status = 400
    type = "invalid_request_error"
    code = "malformed_request"

    def __init__(self, reason: str):
        super().__init__(f"The request is not valid HTTP/1.1 ({reason}); it was not "
                         "forwarded.")

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}  # also when the error middleware answers it


class UnsupportedTransferEncoding(GatewayError):
    status = 501  # RFC 9112 section 6.1: a transfer coding the server does not understand
    type = "invalid_request_error"
    code = "unsupported_transfer_encoding"

    def __init__(self) -> None:
        super().__init__("The only transfer coding this gateway accepts is 'chunked' "
                         "(Transfer-Encoding: chunked); the request was not forwarded.")


class BodyTimeout(GatewayError):
    """408: the client's body was too slow (``errors.RequestTimeout`` is the upstream's
    total deadline, a 504)."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def __init__(self, seconds: float):
        super().__init__(f"The request body did not arrive within {seconds:g} s of its headers.")

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class TooManyConnections(GatewayError):
    """503 with ``type`` ``server_error``: SDKs retry it, after ``Retry-After``."""

    status = 503
    code = "too_many_connections"

    def __init__(self) -> None:
        super().__init__("This gateway worker has as many client connections open as it "
                         "accepts (server.max_connections). Retry after 1 s.")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class UsageUnavailable(GatewayError):
    """503: the Redis that holds the totals cannot answer."""

    status = 503
    code = "usage_unavailable"

    def __init__(self) -> None:
        super().__init__("The usage totals are kept in Redis, which cannot answer now.")

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


# Failures an upstream call is tried again after (``resilience/retry.py``): the request never
# reached the upstream. A timeout after it was sent is not retried: the first try may
# still be generating (and billing) upstream, and the client's wait would double.
RETRYABLE_ERRORS = (UpstreamUnreachable, ConnectTimeout)


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_json(error: GatewayError) -> bytes:
    return orjson.dumps(error.body())


def sse_error_event(error: GatewayError) -> bytes:
    """An SSE ``error`` event: how a stream that already sent 200 reports a failure.

    The OpenAI SDK raises ``APIError`` on it, and because it is never followed by
    ``data: [DONE]`` no client can mistake a truncated answer for a complete one.
    """
    return b"event: error\ndata: " + error_json(error) + b"\n\n"
