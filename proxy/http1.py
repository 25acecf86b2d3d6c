"""HTTP/1.1 exchanges written straight onto connections of the shared ``TCPConnector``.

Why not ``ClientSession.request``: its per-request machinery (request and response
objects, header merging, payload lookup, timers, head and body written separately)
is most of what a Python proxy spends per request (issue #3's profile). Here the
connector still does everything that is hard (aiodns resolution and its cache, TLS,
keep-alive pooling, the connection limit), aiohttp's C parser (``ResponseHandler``)
still reads the answer, and a request costs one header serialisation and one write.

The connector is asked for connections with one template ``ClientRequest`` per origin,
built once: it only reads the origin (scheme, host, port, TLS settings) from it.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

_DEFAULT_PORTS = {"http": 80, "https": 443}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
READ_BUFSIZE = 2**16


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """The parts of an upstream answer the gateway uses, as aiohttp parsed them."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    content: aiohttp.StreamReader


@dataclass(frozen=True, slots=True)
class Origin:
    """Everything per-origin, computed once: the connector's template and ``Host``."""

    template: ClientRequest
    host_header: str


def origin_of(url: URL, tls: ssl.SSLContext | None) -> Origin:
    scheme = url.scheme
    host = url.raw_host or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    port = url.port
    host_header = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    template = ClientRequest("GET", url.origin(), loop=asyncio.get_running_loop(),
                             ssl=tls if tls is not None else True)
    return Origin(template, host_header)


def serialize(method: str, url: URL, host_header: str, headers: CIMultiDict[str],
              body: bytes) -> bytes:
    """The request head and body as one buffer, for one write.

    Header values come from aiohttp's parser (which rejects CR and LF) or from the
    validated config, so no line can be injected; ``surrogateescape`` gives back any
    non-UTF-8 bytes exactly as the client sent them.
    """
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1", f"Host: {host_header}"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    if body or method in _BODY_METHODS:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    return head + body if body else head


async def exchange(connection: Connection, payload: bytes, *, head_only: bool,
                   read_timeout: float | None) -> UpstreamResponse:
    """Write the request and wait for the answer's head (1xx answers are skipped).

    Raises aiohttp's client exceptions, or ``HttpProcessingError`` for an answer the
    parser rejects; the caller closes ``connection`` on any exception.
    """
    protocol = connection.protocol
    transport = connection.transport
    if protocol is None or transport is None:
        raise aiohttp.ServerDisconnectedError()
    _expect_answer(protocol, head_only, read_timeout)
    transport.write(payload)
    protocol.start_timeout()  # read_timeout now bounds each silence, head included
    while True:
        message, content = await protocol.read()
        if not 100 <= message.code < 200 or message.code == 101:
            return UpstreamResponse(message.code, message.reason or "", message.headers,
                                    content)


def _expect_answer(protocol: ResponseHandler, head_only: bool,
                   read_timeout: float | None) -> None:
    protocol.set_response_params(
        skip_payload=head_only, auto_decompress=False, read_timeout=read_timeout,
        read_bufsize=READ_BUFSIZE)


__all__ = ["HttpProcessingError", "Origin", "UpstreamResponse", "exchange", "origin_of",
           "serialize"]
