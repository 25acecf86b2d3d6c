"""HTTP/1.1 exchanges on upstream connections leased from the shared ``TCPConnector``.

Why not ``ClientSession.request``, nor even the connector's own ``ResponseHandler`` per
request: their per-request machinery (request and response objects, header merging,
timers re-armed on every read, a new parser and a message queue per answer, the pool's
acquire and release bookkeeping) was most of what a Python proxy spends per request
(issue #3's profile: the bare-protocol probe 19.6k req/s, the same proxy on
``connector.connect`` + ``ResponseHandler`` about 8k, on one core of this machine).

So the connector does what is hard and rare: aiodns resolution and its cache, happy
eyeballs, TLS, and the limit on open connections. Each connection it opens is *leased*
(acquired once, kept until it closes) and its transport handed to an
:class:`UpstreamProtocol`, which parses answers with aiohttp's C parser
(``HttpResponseParser``, reused across the keep-alive answers of the connection) and
holds each exchange to its provider's deadlines (``upstream/deadlines.py``) with one lazily
re-armed timer per connection. A request costs one serialisation
and one write; keep-alive reuse is ``upstream/client.py``'s idle stack of these protocols.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.helpers import EMPTY_BODY_STATUS_CODES, set_exception
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.upstream.deadlines import Deadlines

_DEFAULT_PORTS = {"http": 80, "https": 443}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
READ_BUFSIZE = 2**16


class DeadlineExpired(aiohttp.SocketTimeoutError):
    """A deadline of the exchange expired: ``key`` is its ``timeouts`` key and ``limit``
    its length, which ``upstream/client.py`` turns into the gateway's error for it."""

    def __init__(self, key: str, limit: float):
        super().__init__(f"the {key} deadline of {limit:g} s expired")
        self.key = key
        self.limit = limit


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """The parts of an upstream answer the gateway uses, as aiohttp's parser gave them."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    content: aiohttp.StreamReader


@dataclass(slots=True)
class Origin:
    """Everything per-origin, computed once (the connector's template and ``Host``),
    and the origin's idle keep-alive connections, most recently used last."""

    template: ClientRequest
    host_header: str
    idle: list[UpstreamProtocol] = field(default_factory=list)
    open: int = 0  # connections to this origin, busy or idle
    # Per provider on this origin, its adaptive concurrency limit
    # (``resilience/concurrency.py``): no more connections than their sum (``cap``, 0:
    # none yet) are kept (``follow_limit``).
    caps: dict[str, int] = field(default_factory=dict)
    cap: int = 0


def origin_of(url: URL, tls: ssl.SSLContext | None) -> Origin:
    """The connector only reads the origin (scheme, host, port, TLS) from the template."""
    scheme = url.scheme
    host = url.raw_host or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    port = url.port
    host_header = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    template = ClientRequest("GET", url.origin(), loop=asyncio.get_running_loop(),
                             ssl=tls if tls is not None else True)
    return Origin(template, host_header)


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """What a provider asks the client to send; built by ``Provider.prepare``
    (``Provider.upstream_request``)."""

    method: str
    url: URL
    headers: CIMultiDict[str]
    body: bytes
    tls: ssl.SSLContext | None = None  # None: the system's trusted CAs
    # The provider's own headers (its key, configured headers), serialised once, and
    # the lower-cased names of ``headers`` they replace.
    replaced: frozenset[str] = frozenset()
    credentials: bytes = b""


def serialize(request: UpstreamRequest, host_header: str) -> bytes:
    """The request head and body as one buffer, for one write: the client's headers
    but those the provider replaces, then the provider's own, serialised once.

    Header values come from aiohttp's parser (which rejects CR and LF) or from the
    validated config, so no line can be injected; ``surrogateescape`` gives back any
    non-UTF-8 bytes exactly as the client sent them.
    """
    method, body, replaced = request.method, request.body, request.replaced
    lines = [f"{method} {request.url.raw_path_qs} HTTP/1.1\r\nHost: {host_header}\r\n"]
    if replaced:
        lines.extend([f"{name}: {value}\r\n" for name, value in request.headers.items()
                      if name.lower() not in replaced])
    else:
        lines.extend([f"{name}: {value}\r\n" for name, value in request.headers.items()])
    if body or method in _BODY_METHODS:
        lines.append(f"Content-Length: {len(body)}\r\n")
    head = "".join(lines).encode("utf-8", "surrogateescape")
    return b"".join((head, request.credentials, b"\r\n", body))


class UpstreamProtocol(BaseProtocol):
    """One leased upstream connection: writes requests, parses their answers.

    One exchange at a time: :meth:`request` returns a future for the answer's head (1xx
    answers skipped); the body then arrives in that answer's ``StreamReader``, whose
    fill level pauses reading from the upstream (back-pressure from a slow client).
    Failures reach whoever waits, the head's future or the body's reader, as aiohttp's
    client exceptions, which ``upstream/client.py`` translates.
    """

    __slots__ = ("_answer", "_awaiting_body", "_deadlines", "_exception", "_handler",
                 "_head_at", "_head_only", "_last_data", "_on_closed", "_payload", "_sent_at",
                 "_should_close", "_timer", "idle_since", "lease", "origin")

    def __init__(self, loop: asyncio.AbstractEventLoop, lease: Connection,
                 on_closed: Callable[[], None]):
        super().__init__(loop)
        self._on_closed = on_closed
        self.lease = lease  # the connector's slot for this connection, given back on close
        self._handler = lease.protocol  # the connector's protocol, told when we close
        self._answer: asyncio.Future[UpstreamResponse] | None = None
        self._payload: StreamReader | None = None
        self._exception: BaseException | None = None
        self._should_close = False
        self._head_only = False
        self._deadlines: Deadlines | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sent_at = self._head_at = self._last_data = 0.0
        self._awaiting_body = False  # between the head and the body's first bytes
        self.idle_since = 0.0
        self.origin: Origin | None = None  # where it goes back to (set by the pool)

    @classmethod
    def take_over(cls, lease: Connection, on_closed: Callable[[], None]) -> UpstreamProtocol:
        """Move a fresh connection of the connector onto a new protocol of this class;
        ``on_closed`` runs once, when the connection is gone."""
        transport = lease.transport
        if transport is None:
            raise aiohttp.ServerDisconnectedError()
        protocol = cls(asyncio.get_running_loop(), lease, on_closed)
        transport.set_protocol(protocol)
        protocol.transport = transport
        return protocol

    def __repr__(self) -> str:
        state = "busy" if self._answer is not None or self._payload is not None else "idle"
        return f"<UpstreamProtocol {state} reusable={self.reusable}>"

    def loop_time(self) -> float:
        return self._loop.time()

    @property
    def expired(self) -> bool:
        """True once a deadline ended the exchange (the circuit breaker counts it)."""
        return isinstance(self._exception, DeadlineExpired)

    @property
    def reusable(self) -> bool:
        """True between exchanges on a connection the upstream may reuse."""
        transport = self.transport
        return (transport is not None and not transport.is_closing()
                and not self._should_close and self._exception is None
                and self._answer is None and self._payload is None
                and not self._reading_paused)

    def request(self, payload: bytes, *, head_only: bool, deadlines: Deadlines | None
                ) -> asyncio.Future[UpstreamResponse]:
        """Write one request; the future resolves with the answer's head. A deadline
        that expires fails the head's future or the body's reader with
        :class:`DeadlineExpired`."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise aiohttp.ServerDisconnectedError()
        if self._parser is None or head_only or self._head_only:
            # One parser serves every answer of the connection; only a HEAD needs its own
            # (its answer announces a body that never comes), and the one after it too.
            self._parser = HttpResponseParser(
                self, self._loop, READ_BUFSIZE, payload_exception=aiohttp.ClientPayloadError,
                response_with_body=not head_only, auto_decompress=False)
            self._head_only = head_only
        answer = self._answer = self._loop.create_future()
        self._deadlines = deadlines
        self._awaiting_body = False
        transport.write(payload)
        if deadlines is not None:
            self._sent_at = self._last_data = self._loop.time()
            self._rearm_if_sooner()  # the timer an earlier exchange left usually fires first
        return answer

    def close(self) -> None:
        """Close the connection; the connector's slot is freed in ``connection_lost``."""
        self._should_close = True
        transport = self.transport
        if transport is not None:
            transport.close()
        else:
            self.lease.close()

    def abort(self) -> None:
        """Drop the connection at once (an answer not read to its end)."""
        self._should_close = True
        transport = self.transport
        if transport is not None:
            transport.abort()
        else:
            self.lease.close()

    def data_received(self, data: bytes) -> None:
        if data:
            self._last_data = self._loop.time()
            if self._awaiting_body:  # the body's first bytes: the first token is in
                self._awaiting_body = False
                self._rearm_if_sooner()
        elif self._parser is None or (self._answer is None and self._payload is None):
            return  # resume_reading() on an idle connection: nothing to parse
        parser = self._parser
        if parser is None or (self._answer is None and self._payload is None):
            self._fail(HttpProcessingError(message="data from upstream nobody asked for"))
            return
        try:
            messages, upgraded, _ = parser.feed_data(data)
        except HttpProcessingError as exc:
            self._fail(exc)
            return
        for message, payload in messages:
            if message.should_close or upgraded:
                self._should_close = True
            code = message.code
            if 100 <= code < 200 and code != 101:
                continue  # interim answers (100 Continue, 103 Early Hints)
            answer, self._answer = self._answer, None
            if answer is None:
                self._fail(HttpProcessingError(message="an answer nobody asked for"))
                return
            body = EMPTY_PAYLOAD if self._head_only or code in EMPTY_BODY_STATUS_CODES \
                else payload
            if body is not EMPTY_PAYLOAD:
                self._start_body(body)
            if not answer.done():
                answer.set_result(UpstreamResponse(code, message.reason or "", message.headers,
                                                   body))

    def _start_body(self, body: StreamReader) -> None:
        """The head is in and a body follows: from now on the first token's deadline,
        unless some of the body came with the head."""
        self._payload = body
        if self._deadlines is not None and not body.is_eof():
            self._head_at = self._last_data
            self._awaiting_body = not body.total_bytes
            self._rearm_if_sooner()
        body.on_eof(self._body_complete)

    def _body_complete(self) -> None:
        self._payload = None
        self._awaiting_body = False

    def exchange_done(self) -> bool:
        """End the exchange; True when the connection may serve another request. Its
        timer stays armed: it finds no exchange when it fires, or re-arms for the
        next one's deadline (a timer made and cancelled per exchange cost ~3 % of a
        request's CPU, issue 11's profile)."""
        reusable = self.reusable
        if not reusable:
            self.abort()
        return reusable

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._last_data = self._loop.time()  # the client was slow, not the upstream
        super().resume_reading(resume_parser)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_timer()
        parser, self._parser = self._parser, None
        payload = self._payload
        if parser is not None and payload is not None:
            try:
                parser.feed_eof()  # completes a body delimited by the close
            except Exception as underlying:
                set_exception(payload, aiohttp.ClientPayloadError(
                    f"Response payload is not completed: {underlying!r}"), underlying)
        if self._answer is not None:
            error = (aiohttp.ServerDisconnectedError() if exc is None
                     else aiohttp.ClientOSError(*getattr(exc, "args", ())))
            self._deliver(error)
        self._should_close = True
        super().connection_lost(exc)
        if self._handler is not None:
            self._handler.connection_lost(exc)  # so the connector's own bookkeeping ends
        self.lease.close()
        self._on_closed()

    def _next_deadline(self) -> tuple[float, str, float]:
        """When the exchange's next deadline falls, its ``timeouts`` key and length:
        the head's, the first token's or the silence's, unless ``total`` comes first."""
        deadlines = self._deadlines
        assert deadlines is not None
        if self._answer is not None:
            key, limit, due = "headers", deadlines.headers, self._sent_at + deadlines.headers
        elif self._awaiting_body:
            key, limit = "first_token", deadlines.first_token
            due = self._head_at + limit
        else:
            key, limit, due = "read", deadlines.read, self._last_data + deadlines.read
        total = deadlines.total
        if total is not None and self._sent_at + total <= due:
            return self._sent_at + total, "total", total
        return due, key, limit

    def _check_deadlines(self) -> None:
        """The deadlines, checked lazily: one timer per connection, re-armed when it
        fires for what is left (data came in meanwhile, or a later exchange began)
        rather than on every read or exchange."""
        self._timer = None
        if self._deadlines is None or (self._answer is None and self._payload is None):
            return
        now = self._loop.time()
        due, key, limit = self._next_deadline()
        if due <= now and key == "read" and self._reading_paused:
            self._last_data = now  # the client is slow, not the upstream
            due, key, limit = self._next_deadline()
        if due > now:
            self._timer = self._loop.call_at(due, self._check_deadlines)
            return
        self._fail(DeadlineExpired(key, limit))

    def _rearm_if_sooner(self) -> None:
        """A phase changed (head in, first body bytes in): its deadline may fall before
        the armed timer's. Once per phase, never per read."""
        due = self._next_deadline()[0]
        timer = self._timer
        if timer is None or due < timer.when():
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(due, self._check_deadlines)

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    def _fail(self, exc: BaseException) -> None:
        self._exception = exc
        self._deliver(exc)
        self.abort()

    def _deliver(self, exc: BaseException) -> None:
        answer, self._answer = self._answer, None
        if answer is not None and not answer.done():
            answer.set_exception(exc)
        payload, self._payload = self._payload, None
        if payload is not None:
            if not isinstance(exc, aiohttp.ClientError):  # readers expect client errors
                exc = aiohttp.ClientPayloadError(f"upstream answer invalid: {exc}")
            set_exception(payload, exc)


__all__ = ["DeadlineExpired", "HttpProcessingError", "Origin", "UpstreamProtocol",
           "UpstreamRequest", "UpstreamResponse", "origin_of", "serialize"]
