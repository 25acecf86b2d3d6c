"""How the gateway logs: one handler on stderr and its two formats, as the ``logging``
section (``config/logs.py``) sets them (issue 10, "Access log").

``json`` (the default when stderr is not a terminal: a container, systemd, a file)
writes one JSON object per line: ``time`` (ISO 8601, UTC, ms), ``level``, ``logger``,
``message``, ``request_id`` when the line was logged while a request was handled, and
``exception`` as a string. ``text`` (the default on a terminal) is the classic
``time LEVEL logger: message``. A message may be a :class:`Fields` (the access line,
the start-up config): JSON gets its fields as they are, text its ``str``.

The CLI calls :func:`configure` once the config is loaded, and again on SIGHUP; this
module reads no environment (``PROXY_LOG_*`` are read with the other variables in
``config/loader.py``).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import orjson

from proxy.config.logs import LoggingSettings
from proxy.config.redis import redact

ACCESS_LOGGER = "proxy.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "***"
FLUSH_AFTER = 0.2  # seconds a line may wait to be written with others
FLUSH_LINES = 256
# The request being handled, for the ``request_id`` of the lines logged meanwhile
# (set by ``core.Core``); None outside a request.
CURRENT_REQUEST: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_request", default=None)


class Fields:
    """A log message made of fields. ``whole``: they are the entire JSON line, time,
    level and logger included (the access line, built in one dict by its observer);
    else they are added to the usual ones."""

    __slots__ = ("fields", "whole")

    def __init__(self, fields: dict[str, Any], *, whole: bool = False):
        self.fields = fields
        self.whole = whole

    def __str__(self) -> str:
        fields = dict(self.fields)
        message = fields.pop("message", "")
        return f"{message}: {orjson.dumps(fields, default=str).decode()}"


class _Clock:
    """ISO 8601 UTC times with milliseconds; the part down to the second is formatted
    once per second, not once per line."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def iso(self, at: float) -> str:
        second = int(at)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((at - second) * 1000):03d}Z"


iso_time = _Clock().iso


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.msg
        if isinstance(msg, Fields) and msg.whole:
            return orjson.dumps(msg.fields, default=str).decode()
        line: dict[str, Any] = {"time": iso_time(record.created), "level": record.levelname,
                                "logger": record.name}
        if isinstance(msg, Fields):
            line.update(msg.fields)
        else:
            line["message"] = record.getMessage()
        request_id = getattr(record, "request_id", None) or CURRENT_REQUEST.get()
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


def use_json(settings: LoggingSettings, stream: TextIO) -> bool:
    """``auto``: JSON for machines (a file, a pipe, a container's log), text for people."""
    if settings.format != "auto":
        return settings.format == "json"
    isatty = getattr(stream, "isatty", None)
    return not (isatty is not None and isatty())


class _Handler(logging.StreamHandler[TextIO]):
    """Ours, so that :func:`configure` replaces only the handler it installed; and
    batched: an access line per request written (and flushed) on its own cost a system
    call each, the largest part of the access log's cost in the gateway's profile.
    Access lines wait at most ``FLUSH_AFTER`` seconds (a timer on the running event
    loop; with no loop, at once) or ``FLUSH_LINES`` lines; any other line is written at
    once, after those waiting; ``close`` (``logging.shutdown`` at exit, a reload's new
    handler) writes what is left."""

    def __init__(self, stream: TextIO):
        super().__init__(stream)
        self._pending: list[str] = []
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record))
        except Exception:  # as StreamHandler.emit: a bad record must not break a request
            self.handleError(record)
            return
        if record.name != ACCESS_LOGGER or len(self._pending) >= FLUSH_LINES:
            self.flush()  # (any other line is rare, and wanted at once)
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(FLUSH_AFTER, self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # (made in Handler.__init__)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._pending:
                lines, self._pending = self._pending, []
                self.stream.write("\n".join(lines) + "\n")
            super().flush()

    def write_json(self, lines: list[dict[str, Any]]) -> None:
        """Whole JSON lines straight from their fields (the access log's batch,
        ``json_handler``): what ``emit`` would write for each, in one write."""
        text = b"\n".join([orjson.dumps(fields, default=str) for fields in lines]).decode()
        with self.lock:  # type: ignore[union-attr]
            self._pending.append(text)
        self.flush()

    def close(self) -> None:
        self.flush()
        super().close()


def json_handler(logger: logging.Logger) -> _Handler | None:
    """The handler :func:`configure` installed, when it is the only one ``logger``'s
    INFO lines reach, in the JSON format, with no filter on the way; else None (a
    test's capture, a handler an embedding program added: those get ``LogRecord``s)."""
    if logger.disabled or logger.filters:  # (only the first logger's filters apply)
        return None
    current: logging.Logger | None = logger
    while current is not None and not current.handlers:
        current = current.parent if current.propagate else None
    if current is None or len(current.handlers) != 1:
        return None
    handler = current.handlers[0]
    if (isinstance(handler, _Handler) and isinstance(handler.formatter, JsonFormatter)
            and not handler.filters and handler.level <= logging.INFO):
        return handler
    return None


def configure(settings: LoggingSettings, stream: TextIO | None = None) -> None:
    """Install (or, on SIGHUP, replace) the one handler on the root logger, set the
    level, and switch the access log on or off: off, ``proxy.access`` sits above
    every level, so its observer's ``isEnabledFor`` is false and nothing is built."""
    stream = stream or sys.stderr
    handler = _Handler(stream)
    handler.setFormatter(JsonFormatter() if use_json(settings, stream)
                         else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(settings.level)
    logging.getLogger(ACCESS_LOGGER).setLevel(
        logging.NOTSET if settings.access_log else logging.CRITICAL + 1)


# Field names whose values are secret wherever they appear in the config.
_SECRET_FIELDS = frozenset({"api_key", "sha256", "password", "secret", "token"})


def redacted(value: Any, name: str = "") -> Any:
    """A config (any frozen dataclass tree) as plain JSON-able data, with secrets
    replaced by ``***``: provider keys, gateway key hashes (not secrets, but they let
    anyone test guesses of a weak secret offline, and the names say which key is
    which), configured header values, and passwords in URLs (Redis, a base_url)."""
    if name in _SECRET_FIELDS:
        return None if value is None else REDACTED
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: redacted(getattr(value, f.name), f.name)
                for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):  # a header's name is not secret; its value may be a key
        return {str(key): REDACTED if name == "headers" else redacted(item)
                for key, item in value.items()}
    if isinstance(value, tuple | list | set | frozenset):
        return [redacted(item, name) for item in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _redacted_text(str(value))


def _redacted_text(text: str) -> str:
    """A URL without what may hold a key: all its user-info (``https://sk-...@host``)
    and every query value (``?key=...``); the scheme, host and path stay readable."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(redact(text))
    except ValueError:  # not a URL after all: nothing to tell its secret by, so all of it
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    query = "&".join(f"{pair.partition('=')[0]}={REDACTED}"
                     for pair in parts.query.split("&") if pair)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
