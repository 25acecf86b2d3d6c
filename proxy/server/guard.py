"""HTTP safety at the client edge (issue #4): what one client connection may cost a
worker, before and while the app sees its request.

aiohttp parses requests with llhttp in strict mode, which refuses the shapes used for
request smuggling (Content-Length with Transfer-Encoding, two Content-Lengths, malformed
chunks, obs-fold, a bare LF or CR) before any handler runs. ``GuardedHandler``, aiohttp's
per-connection ``RequestHandler`` (wired by ``GuardedRunner`` in ``server/serve.py``), adds,
from ``server.*`` in the config:

* ``max_header_bytes``: the request line and headers together; more gets 431;
* ``header_timeout``: a head must be complete this long after the connection opened or,
  on a kept-alive connection, after its first byte, else the connection is closed. No
  408, like nginx: the client may be about to send a request on what it sees as an idle
  connection, and would read the 408 as its answer; a closed connection it retries;
* ``body_timeout``: a body must be complete this long after its head, else 408 (or the
  connection is closed, if the answer has started). A deadline, not an idle timeout, so a
  body trickled a byte at a time is cut too;
* ``keepalive_timeout``: how long an idle connection is kept (aiohttp's own timer);
* ``max_connections`` per worker, over all its sockets: a connection beyond it gets one
  503 + ``Retry-After`` + ``Connection: close``. Answered after its request's head, not
  closed at once: closing with the request unread resets the connection (the client
  may lose the answer), and a 503 says what happened where a reset looks like a network
  fault (through nginx: a 502 "upstream prematurely closed");
* parser errors get OpenAI-shaped JSON (aiohttp: text/plain) and a debug log line
  (aiohttp: an ERROR traceback per bad request, which any client could flood);
* HTTP/0.9 and chunked HTTP/1.0 (400), and transfer codings other than ``chunked`` (501:
  ``gzip, chunked``, which llhttp accepts, and ``gzip`` alone, which it refuses as a 400);
* a content coding aiohttp cannot decode here (``br`` without Brotli): 415; a body that
  fails to decode is not drained afterwards (aiohttp would log a traceback for it).

Hot path: each connection has at most one timer, set for its earliest deadline. When it
fires it re-arms for the deadline that holds then, if any (as aiohttp's keep-alive timer
does), so moving a deadline is an attribute write; a busy connection sees about one timer
event per ``header_timeout``. Per read, a few attribute reads; per request, a version and
a chunked check.

This reaches into ``RequestHandler``'s internals (its message queue and ``_ErrInfo``
entries, as of aiohttp 3.14): tests/test_http_safety*.py fail if an upgrade changes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion10, HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import (
    BadHttpMessage,
    ContentEncodingError,
    HttpProcessingError,
    LineTooLong,
)
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest

from proxy.config.sections import ServerConfig
from proxy.core import CORE, Core
from proxy.errors import (
    BodyTimeout,
    GatewayError,
    HeadersTooLarge,
    MalformedRequest,
    TooManyConnections,
    UnsupportedContentEncoding,
    UnsupportedTransferEncoding,
)
from proxy.headers import DECODED_CODINGS
from proxy.middlewares import error_response
from proxy.observe.observers import OBSERVERS, Observers
from proxy.record import Record

_Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]

log = logging.getLogger("proxy.http_safety")

MAX_HEADERS = 128  # header fields per request (aiohttp's default, made explicit)
_TOO_MANY_HEADERS = "Too many headers received"  # aiohttp's message for MAX_HEADERS
# llhttp's message for a request whose Transfer-Encoding does not end in "chunked"
# (``gzip`` alone, say): a coding it does not implement, no framing ambiguity, so a 501
# (RFC 9112 section 6.1). "chunked" not last, or twice, is llhttp's "Invalid
# `Transfer-Encoding` header value", and with a Content-Length it is its own error: both
# stay 400. (aiohttp's pure-Python parser, without its C extension, uses this message for
# all three: they get 501, still refused and never forwarded.)
_TE_NOT_CHUNKED = "Request has invalid `Transfer-Encoding`"
REFUSAL_LOG_INTERVAL = 60.0  # seconds between two "connections refused" warnings


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` whose connections are ``GuardedHandler``s."""

    __slots__ = ("_settings",)

    def __init__(self, app: web.Application, settings: ServerConfig, **kwargs: Any):
        super().__init__(app, keepalive_timeout=settings.keepalive_timeout,
                         max_line_size=settings.max_header_bytes,
                         max_field_size=settings.max_header_bytes, max_headers=MAX_HEADERS,
                         **kwargs)
        self._settings = settings

    async def _make_server(self) -> web.Server:
        """aiohttp's server for the app, with the gateway's own request handler
        (``core.Core``) in place of the app's router."""
        return GuardedServer(await super()._make_server(), self._settings,
                             self.app.get(OBSERVERS), self.app.get(CORE))


class GuardedServer(web.Server):
    """The protocol factory the sites listen with: aiohttp's ``Server`` for the app, making
    ``GuardedHandler``s and counting the connections they hold."""

    def __init__(self, plain: web.Server, settings: ServerConfig,
                 observers: Observers | None = None, core: Core | None = None):
        # The app's request factory makes ``web.Request``s: what ``Core`` takes.
        handler = plain.request_handler if core is None else cast(_Handler, core)
        super().__init__(handler, request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                         **plain._kwargs)
        self.settings = settings
        self.observers = observers or Observers()  # the app's: told of refusals too
        self.open = 0
        self.refused = 0
        self._next_warning = 0.0

    def __call__(self) -> GuardedHandler:
        return GuardedHandler(self, loop=self._loop, **self._kwargs)

    def __repr__(self) -> str:
        return (f"<GuardedServer open={self.open}/{self.settings.max_connections} "
                f"refused={self.refused}>")

    def admit(self) -> bool:
        if self.open < self.settings.max_connections:
            self.open += 1
            return True
        self.refused += 1
        if (now := time.monotonic()) >= self._next_warning:
            self._next_warning = now + REFUSAL_LOG_INTERVAL
            log.warning("%d client connections open (server.max_connections): new ones get "
                        "503 (%d so far)", self.open, self.refused)
        return False

    def release(self) -> None:
        self.open -= 1

    def refused_request(self, request: BaseRequest, error: GatewayError) -> web.Response:
        """``error``'s closing answer, and its record for the access log and metrics:
        the middlewares never see these requests (issue 10: refused ones are logged)."""
        now = time.perf_counter()
        record = Record(now, request.method, path="other", client=request.remote,
                        status=error.status, error_code=error.code, first_byte=now,
                        finished=now)
        self.observers.ended(record)
        return _closing(error)


class GuardedHandler(RequestHandler):
    """One client connection. Its clocks: ``_head_started`` while a head is awaited,
    ``_body_deadline`` while ``_body`` (the last parsed request's) is incomplete."""

    __slots__ = ("_admitted", "_body", "_body_deadline", "_guard", "_head_bytes",
                 "_head_started", "_timer")

    def __init__(self, guard: GuardedServer, **kwargs: Any):
        super().__init__(guard, **kwargs)
        self._guard = guard
        self._admitted = False
        self._head_started: float | None = None
        self._head_bytes = 0
        self._body: StreamReader | None = None
        self._body_deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._guard.admit():
            self._admitted = True
        else:
            self._request_handler = self._refuse
        super().connection_made(transport)
        self._start_head()  # the first head's clock starts at accept

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._admitted:
            self._admitted = False
            self._guard.release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._close or self._force_close:
            return
        messages = self._messages
        queued = len(messages)
        body = self._body
        in_head = body is None or body.is_eof()  # these bytes are (part of) a head
        if in_head and data:
            if self._head_started is None:
                self._start_head()
            self._head_bytes += len(data)
        super().data_received(data)
        if len(messages) != queued:
            self._parsed(queued)
        elif in_head and self._head_bytes > self._guard.settings.max_header_bytes:
            self._queue_error(HeadersTooLarge(self._guard.settings.max_header_bytes, MAX_HEADERS))
        body = self._body
        if body is not None and body.exception() is not None:
            # A body that failed to decode (bad gzip): the handler answers 400; aiohttp
            # would then drain the rest and log its error as an "Unhandled exception"
            # traceback. Read nothing more: close once the answer is sent.
            self._lingering_time = 0.0

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (and to a handler's crash,
        which stays aiohttp's)."""
        error = _client_error(exc, self._guard.settings.max_header_bytes)
        if error is None:
            return super().handle_error(request, status, exc, message)
        log.debug("refused a request from %s: %r", request.remote, exc)
        return self._guard.refused_request(request, error)

    async def _refuse(self, request: BaseRequest) -> web.StreamResponse:
        """The request handler of a connection over ``max_connections``."""
        return self._guard.refused_request(request, TooManyConnections())

    def _parsed(self, first: int) -> None:
        """Heads were parsed from ``_messages[first:]``, or a parser error was queued:
        refuse what llhttp lets through, and start the last body's clock."""
        settings = self._guard.settings
        messages = self._messages
        # Only when the reads since the head began hold more than the limit can the head
        # be larger: only then is it measured. (A pipelined head that begins in the read
        # that ends a body is bounded by aiohttp's per-line and per-field limits alone.)
        head_limit = settings.max_header_bytes if self._head_bytes > settings.max_header_bytes \
            else 0
        self._head_started = None
        self._head_bytes = 0
        for index in range(first, len(messages)):
            message, payload = messages[index]
            if isinstance(message, _ErrInfo):  # aiohttp answers it; a body it cut is failed
                if self._body is not None and not self._body.is_eof():
                    self._fail_body(self._body, MalformedRequest(type(message.exc).__name__))
                return
            if (error := _refusal(message, head_limit)) is not None:
                while len(messages) > index + 1:
                    messages.pop()
                messages[index] = _error_message(error)
                self.close()  # parse nothing more; close after answering
                return
            self._body = payload
        if self._body is not None and not self._body.is_eof():
            self._body_deadline = self._loop.time() + settings.body_timeout
            self._arm(self._body_deadline)

    def _queue_error(self, error: GatewayError) -> None:
        """Answer ``error`` in place of a head that cannot be parsed, then close."""
        self._messages.append(_error_message(error))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.close()

    def _start_head(self) -> None:
        now = self._loop.time()
        self._head_started = now
        self._arm(now + self._guard.settings.header_timeout)

    def _arm(self, deadline: float) -> None:
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return  # it fires first, and re-arms for this deadline
            timer.cancel()
        self._timer = self._loop.call_at(deadline, self._check)

    def _check(self) -> None:
        """At the earliest deadline armed: close a connection whose head is late, fail a
        body that is late, else re-arm for the deadline that holds now (if any)."""
        self._timer = None
        if self.transport is None:
            return
        now = self._loop.time()
        settings = self._guard.settings
        if self._head_started is not None:
            deadline = self._head_started + settings.header_timeout
            if now >= deadline and not (self._request_in_progress or self._messages):
                self.force_close()
                return
            if now >= deadline:
                # Bytes after a body while its answer is still being sent (a stray CRLF,
                # a pipelined head): never cut that answer; the clock starts over.
                self._head_started, deadline = now, now + settings.header_timeout
            self._arm(deadline)
        body = self._body
        if body is not None and not body.is_eof():
            if now >= self._body_deadline:
                self._fail_body(body, BodyTimeout(settings.body_timeout))
            else:
                self._arm(self._body_deadline)

    def _fail_body(self, body: StreamReader, error: GatewayError) -> None:
        """``body`` will not complete: the handler reading it raises ``error`` (the error
        middleware answers it); if no handler is reading it, the connection is closed."""
        self._body = None
        request = self._current_request
        if request is None or request.content is not body:
            self.force_close()
            return
        self._lingering_time = 0.0  # read nothing more: close once the answer is sent
        body.set_exception(error)


def _refusal(message: RawRequestMessage, head_limit: int) -> GatewayError | None:
    """What llhttp accepts and the gateway does not; ``head_limit`` 0: not measured."""
    if head_limit and _head_size(message) > head_limit:
        return HeadersTooLarge(head_limit, MAX_HEADERS)
    if message.version < HttpVersion10:
        return MalformedRequest("HTTP/0.9")
    if not message.chunked:
        return None
    if message.version < HttpVersion11:  # RFC 9112 section 6.1: its framing is faulty
        return MalformedRequest("Transfer-Encoding in HTTP/1.0")
    if message.headers.get(hdrs.TRANSFER_ENCODING, "").lower() != "chunked":
        return UnsupportedTransferEncoding()
    return None


def _head_size(message: RawRequestMessage) -> int:
    """The request line and header fields as sent, CRLFs included (give or take the
    optional spaces around values)."""
    line = len(message.method) + len(message.path) + len(" HTTP/1.1\r\n") + 1
    return line + 2 + sum(len(name) + len(value) + 4 for name, value in message.raw_headers)


def _client_error(exc: BaseException | None, head_limit: int) -> GatewayError | None:
    if isinstance(exc, GatewayError):  # queued by GuardedHandler itself
        return exc
    if isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS):
        return HeadersTooLarge(head_limit, MAX_HEADERS)
    if isinstance(exc, ContentEncodingError):  # br or zstd without its package, at the head
        return UnsupportedContentEncoding(", ".join(DECODED_CODINGS))  # (a bad body: 400)
    if isinstance(exc, BadHttpMessage) and exc.message.startswith(_TE_NOT_CHUNKED):
        return UnsupportedTransferEncoding()
    if isinstance(exc, HttpProcessingError):
        return MalformedRequest(type(exc).__name__)
    return None


def _error_message(error: GatewayError) -> tuple[_ErrInfo, StreamReader]:
    """A parser-error entry for the handler's queue: aiohttp answers it with
    ``handle_error`` in its turn, after the answers before it."""
    return _ErrInfo(status=error.status, exc=error, message=error.message), EMPTY_PAYLOAD


def _closing(error: GatewayError) -> web.Response:
    """``error``'s answer, after which the connection is closed (and says so: aiohttp
    would not for its HTTP/1.0 answer to a request it could not parse)."""
    response = error_response(error)
    response.force_close()
    response.headers[hdrs.CONNECTION] = "close"
    return response

