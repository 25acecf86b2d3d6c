"""A whole answer, its body in memory, written to the client as one head and body.

Most answers are whole: a non-stream completion or embedding, an error, a cached answer.
``web.Response`` copies the headers it is given, then on ``prepare`` rebuilds them
(keep-alive, Content-Type, Date, Server, Content-Length), runs the app's
``on_response_prepare`` walk and serialises them; its ``write_eof`` goes through the
payload machinery: 5-6 % of a request's CPU (issue 11's profile), for headers the
gateway had already filtered (``headers.end_to_end``). :class:`WholeResponse` keeps that
one copy as its headers (``_real_headers``, aiohttp's own way to skip the copy) and, for
the common case (HTTP/1.1, a status and method that carry a body), writes the head with
aiohttp's C serialiser (which refuses CR and LF in any value) and the body in one
transport write. Everything else (HEAD, 204, 304, HTTP/1.0, and a response someone
asked to compress, chunk or set a cookie on) takes ``web.Response``'s path unchanged,
over the same headers.
"""

from __future__ import annotations

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.compression_utils import MAX_SYNC_CHUNK_SIZE
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from multidict import CIMultiDict


class WholeResponse(web.Response):
    """``web.Response(status, reason, headers, body)`` without copying ``headers``:
    the caller hands them over and must not touch them after ``prepare``."""

    def __init__(self, status: int, reason: str | None, headers: CIMultiDict[str],
                 body: bytes):
        web.StreamResponse.__init__(self, status=status, reason=reason,
                                    _real_headers=headers)
        self._body = body
        self._compressed_body = None
        self._zlib_executor_size = MAX_SYNC_CHUNK_SIZE  # as web.Response's own __init__
        self._zlib_executor = None
        self._whole = body

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent or self._payload_writer is not None:
            return await super().prepare(request)
        if self._headers.get(hdrs.CONNECTION, "").lower() == "close":
            self._keep_alive = False  # an answer that says close, closes (a malformed request)
        if (request.version != HttpVersion11 or must_be_empty_body(request.method, self.status)
                or self._compression or self._chunked or self._cookies):
            return await super().prepare(request)  # what the fast path does not do
        writer = request._payload_writer
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        headers = self._headers
        body = self._whole
        headers[hdrs.CONTENT_LENGTH] = str(len(body))
        if body and hdrs.CONTENT_TYPE not in headers:
            headers[hdrs.CONTENT_TYPE] = "application/octet-stream"
        if hdrs.DATE not in headers:
            headers[hdrs.DATE] = rfc822_formatted_time()
        if hdrs.SERVER not in headers:
            headers[hdrs.SERVER] = SERVER_SOFTWARE
        if not keep_alive and hdrs.CONNECTION not in headers:
            headers[hdrs.CONNECTION] = "close"
        self._req = request
        self._payload_writer = writer
        await writer.write_headers(f"HTTP/1.1 {self._status} {self._reason}", headers)
        await writer.write_eof(body)  # the head and the body coalesced: one write
        self._eof_sent = True
        self._body_length = writer.output_size
        self._req = None
        self._payload_writer = None
        return None
