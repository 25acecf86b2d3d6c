"""The access log: one line per request, from its ``Record`` (issue 10, "Access log").

:class:`AccessLog` is an observer (``observe/observers.py``), told of every request once it
has ended, refused ones (401, 403, 404, 413, 429) included. It logs at INFO on the
``proxy.access`` logger through the handler ``logs.configure`` installed, so the line
is JSON or text like every other line, and ``--log-level WARNING`` or
``logging.access_log: false`` silence it.

Cost, per batch of requests (``observe/observers.py``): when the logger is off, one
``isEnabledFor`` (a cached lookup) and nothing else; when on, per request one dict and
one ``orjson.dumps``, and one write for the batch (``logs.json_handler``); any other
handler gets a ``LogRecord`` per line, made directly (no caller, thread or process
lookup, no ``extra=`` merge). Only bounded, non-secret values are logged: the
key's configured name, never its secret.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from proxy.observe.logs import ACCESS_LOGGER, Fields, iso_time, json_handler
from proxy.record import Record

_INFO = logging.INFO
# Shown first in the text format, without their names.
_HEAD = ("time", "level", "logger", "method", "route", "status", "duration_ms")


class AccessLine(Fields):
    """The access line's fields (the whole JSON line); as text, ``POST
    /v1/chat/completions 200 12.3ms`` then ``name=value`` for each field set."""

    __slots__ = ()

    def __str__(self) -> str:
        f = self.fields
        rest = " ".join(f"{name}={value}" for name, value in f.items()
                        if name not in _HEAD and value is not None and value is not False)
        return f"{f['method']} {f['route']} {f['status']} {f['duration_ms']}ms {rest}".rstrip()


class _AccessRecord(logging.LogRecord):
    """A ``LogRecord`` with what ``LogRecord.__init__`` looks up per record (thread,
    process, the caller's file) known once: this process's observers always run on its
    event loop's thread. Measured 0.7 us instead of 1.9 (issue 10: under 10 % of the
    gateway's per-request CPU for everything it added)."""

    def __init__(self, name: str, msg: AccessLine, now: float):
        self.__dict__.update(_CONSTANT)
        self.name = name
        self.msg = msg
        self.created = now
        self.msecs = (now - int(now)) * 1000 // 1
        self.relativeCreated = (now - _STARTED) * 1000


_STARTED: float = logging._startTime  # type: ignore[attr-defined]  # as LogRecord's
_CONSTANT = {
    "args": None, "levelname": "INFO", "levelno": _INFO, "pathname": __file__,
    "filename": "access_log.py", "module": "access_log", "exc_info": None,
    "exc_text": None, "stack_info": None, "lineno": 0, "funcName": "__call__",
    "thread": threading.get_ident(), "threadName": threading.current_thread().name,
    "process": os.getpid(), "processName": "MainProcess", "taskName": None}


class AccessLog:
    """The observer (``observers.Observer``); ``logger`` for tests (default:
    ``proxy.access``). A batch's lines go out together, each with its request's end as
    its ``time``. When they reach only the JSON handler ``logs.configure`` installed
    (the usual case: no other handler, no filter), each line is one ``orjson.dumps``
    and the batch one write (``logs.write_json``): the ``logging`` machinery per line
    (a record, its handlers, its formatter) cost more than the line itself."""

    def __init__(self, logger: logging.Logger | None = None):
        self._log = logger or logging.getLogger(ACCESS_LOGGER)

    def __repr__(self) -> str:
        return f"<AccessLog {self._log.name} on={self._log.isEnabledFor(_INFO)}>"

    def __call__(self, records: list[Record]) -> None:
        log = self._log
        if not log.isEnabledFor(_INFO):
            return
        to_wall = time.time() - time.perf_counter()  # each line's time: its request's end
        # (A forwarded request: the worker the client reached logs it.)
        logged = [record for record in records if not record.forwarded]
        handler = json_handler(log)
        if handler is not None:
            handler.write_json([line(record, to_wall) for record in logged])
            return
        for record in logged:
            fields = line(record, to_wall)
            log.handle(_AccessRecord(log.name, AccessLine(fields, whole=True),
                                     record.finished + to_wall))


_NO_ORIGIN = (None, None, 0, None)
_NO_USAGE = (None, None, None, None, None)


def line(record: Record, to_wall: float) -> dict[str, Any]:
    """The access line's fields, in the order they are written (README "Logs");
    ``to_wall`` turns ``perf_counter`` times into wall-clock ones. Milliseconds to the
    microsecond as ``int(us + 0.5) / 1000``: a third of ``round``'s cost."""
    origin = record.origin
    provider, upstream_model, attempts, taken = _NO_ORIGIN if origin is None else (
        origin.provider, origin.upstream_model, origin.attempts, origin.taken)
    usage = record.usage
    tokens_in, tokens_out, cached, reasoning, source = _NO_USAGE if usage is None else (
        usage.input, usage.output, usage.cached, usage.reasoning, usage.source)
    started = record.started
    first = record.first_byte
    duration = record.finished - started
    wait = record.upstream_wait
    return {
        "time": iso_time(record.finished + to_wall), "level": "INFO", "logger": ACCESS_LOGGER,
        "request_id": record.request_id, "method": record.method, "route": record.path,
        "status": record.status, "error_code": record.error_code,
        "key_name": record.key_name, "model": record.model, "provider": provider,
        "upstream_model": upstream_model, "stream": record.stream,
        "upstream_status": record.upstream_status, "attempts": attempts, "taken": taken,
        "cache": record.cache, "dedup": record.dedup, "peer": record.peer,
        "ended": record.ended,
        "ttfb_ms": None if first is None else int((first - started) * 1e6 + 0.5) / 1000,
        "duration_ms": int(duration * 1e6 + 0.5) / 1000,
        "upstream_ms": int(wait * 1e6 + 0.5) / 1000,
        "overhead_ms": int(record.overhead() * 1e6 + 0.5) / 1000,
        "tokens_in": tokens_in, "tokens_out": tokens_out, "tokens_cached": cached,
        "tokens_reasoning": reasoning, "tokens_source": source,
        "bytes_in": record.bytes_in, "bytes_out": record.bytes_out,
        "client": record.client,
    }
