"""The access log: one line per request, from its ``Record`` (issue 10, "Access log").

:class:`AccessLog` is an observer (``record.py``), told of every request once it has
ended, refused ones (401, 403, 404, 413, 429) included. It logs at INFO on the
``proxy.access`` logger through the handler ``logs.configure`` installed, so the line
is JSON or text like every other line, and ``--log-level WARNING`` or
``logging.access_log: false`` silence it.

Cost, on every request: when the logger is off, one ``isEnabledFor`` (a cached
lookup) and nothing else; when on, one dict, one ``LogRecord`` made directly (no
caller lookup, no ``extra=`` merge), one ``orjson.dumps`` and one write. Only bounded,
non-secret values are logged: the key's configured name, never its secret.
"""

from __future__ import annotations

import logging
from typing import Any

from proxy.logs import ACCESS_LOGGER, Fields, iso_time
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
        return f"{f['method']} {f['route']} {f['status']} {f['duration_ms']}ms {rest}"


class AccessLog:
    """The observer; ``logger`` for tests (default: ``proxy.access``)."""

    def __init__(self, logger: logging.Logger | None = None):
        self._log = logger or logging.getLogger(ACCESS_LOGGER)

    def __repr__(self) -> str:
        return f"<AccessLog {self._log.name} on={self._log.isEnabledFor(_INFO)}>"

    def __call__(self, record: Record) -> None:
        log = self._log
        if not log.isEnabledFor(_INFO):
            return
        fields = line(record)
        entry = logging.LogRecord(log.name, _INFO, __file__, 0, AccessLine(fields, whole=True),
                                  None, None)
        fields["time"] = iso_time(entry.created)
        log.handle(entry)


def line(record: Record) -> dict[str, Any]:
    """The access line's fields, in the order they are written (README "Logs")."""
    origin = record.origin
    usage = record.usage
    started = record.started
    first = record.first_byte
    duration = record.finished - started
    wait = record.upstream_wait
    # The gateway's own time before the answer's first byte, as X-Gateway-Overhead-Ms
    # says: a stream's later chunks are the upstream's pace, not overhead.
    overhead = (first - started if first is not None else duration) - wait
    return {
        "time": "", "level": "INFO", "logger": ACCESS_LOGGER,
        "request_id": record.request_id, "method": record.method, "route": record.path,
        "status": record.status, "error_code": record.error_code,
        "key_name": record.key_name, "model": record.model,
        "provider": origin.provider if origin is not None else None,
        "upstream_model": origin.upstream_model if origin is not None else None,
        "stream": record.stream, "upstream_status": record.upstream_status,
        "attempts": origin.attempts if origin is not None else 0,
        "taken": origin.taken if origin is not None else None,
        "cache": record.cache, "dedup": record.dedup, "peer": record.peer,
        "ended": record.ended,
        "ttfb_ms": None if first is None else round((first - started) * 1000, 3),
        "duration_ms": round(duration * 1000, 3),
        "upstream_ms": round(wait * 1000, 3),
        "overhead_ms": round(max(overhead, 0.0) * 1000, 3),
        "tokens_in": usage.input if usage is not None else None,
        "tokens_out": usage.output if usage is not None else None,
        "tokens_cached": usage.cached if usage is not None else None,
        "tokens_reasoning": usage.reasoning if usage is not None else None,
        "tokens_source": usage.source if usage is not None else None,
        "bytes_in": record.bytes_in, "bytes_out": record.bytes_out,
        "client": record.client,
    }
