"""One load-generator connection: a bare ``asyncio.Protocol`` that sends one rendered
request per answer and parses the answer in place (``Content-Length`` or chunked
framing, no trailers), with no task, future or object per request (see ``bench.load``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from bench.load import _Driver as Driver

_MAX_HEAD = 64 * 1024
_now = time.perf_counter
_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding|connection):[ \t]*([^\r]*)")


class Conn(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time; parses in place."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = self.close = self.chunked = self.last_chunk = self.newline = False
        self.status = self.remaining = self.events = 0
        self.scheduled = self.written = self.first_byte = self.first_event = 0.0
        self.last_event = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:  # one write per request already; never wait for Nagle
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, scheduled: float) -> None:
        """Reset the parser and send the one pre-rendered request."""
        self.scheduled, self.written = scheduled, _now()
        self.busy, self.status, self.remaining, self.last_chunk = True, 0, 0, False
        self.first_byte = self.first_event = self.last_event = 0.0
        self.events, self.newline = 0, False
        assert self.transport is not None
        self.transport.write(self.driver.request)

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.driver.fail(self, "unexpected_data")
            return
        now = _now()
        self.buf += data
        if not self.status:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0 or not self._head(bytes(self.buf[:end])):
                if end >= 0 or len(self.buf) > _MAX_HEAD:
                    self.driver.fail(self, "bad_response")
                return
            del self.buf[: end + 4]
        if self.chunked:
            done = self._chunked_done(now)
        else:  # Content-Length: count the bytes down, keep none
            if self.buf:
                self._body(self.buf, now)
                self.remaining -= len(self.buf)
                self.buf.clear()
            done = self.remaining <= 0
        if done:
            self.busy = False
            self.driver.finished(self, now)

    def _head(self, head: bytes) -> bool:
        """Status and framing of the answer; ``False`` for one this parser cannot read."""
        lower = head.lower()
        if not lower.startswith((b"http/1.1 ", b"http/1.0 ")) or not head[9:12].isdigit():
            return False
        self.status = int(head[9:12])
        fields = dict(_FRAMING.findall(lower))
        connection = fields.get(b"connection", b"").strip()
        self.close = connection == b"close" or (
            lower.startswith(b"http/1.0") and connection != b"keep-alive")
        self.chunked = b"chunked" in fields.get(b"transfer-encoding", b"")
        if not self.chunked and b"content-length" in fields:
            self.remaining = int(fields[b"content-length"])
        elif not self.chunked and self.status not in (204, 304):
            return False  # a body delimited by closing the connection is not measured
        return True

    def _body(self, data: bytes | bytearray, now: float) -> None:
        if not self.first_byte:
            self.first_byte = now
        if self.driver.count_events:
            found = data.count(b"\n\n") + (self.newline and data[:1] == b"\n")
            self.newline = data[-1:] == b"\n"
            if found:
                self.first_event = self.first_event or now
                self.last_event, self.events = now, self.events + found

    def _chunked_done(self, now: float) -> bool:
        """Consume chunked framing; ``remaining`` is the current chunk's data plus CRLF."""
        buf = self.buf
        while True:
            if self.remaining:
                taken = min(len(buf), self.remaining)
                if not taken:
                    return False
                data = min(taken, self.remaining - 2)
                if data > 0:  # copied only when SSE events are counted
                    self._body(buf[:data] if self.driver.count_events else b"", now)
                del buf[:taken]
                self.remaining -= taken
                if not self.remaining and self.last_chunk:
                    return True
                continue
            end = buf.find(b"\r\n")
            if end < 0:
                return False
            size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
            del buf[: end + 2]
            self.remaining, self.last_chunk = size + 2, size == 0

    def connection_lost(self, exc: Exception | None) -> None:
        self.driver.lost(self)
