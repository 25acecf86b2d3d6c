"""The ``logging`` section: level, format and the access log (``observe/logs.py`` applies
it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config import validate as v

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

FORMATS = ("auto", "json", "text")


@dataclass(frozen=True)
class LoggingSettings:
    """The ``logging`` section. ``level``: PROXY_LOG_LEVEL, ``--log-level``;
    ``format``: PROXY_LOG_FORMAT (``auto``: json unless stderr is a terminal);
    ``access_log``: one INFO line per request on the ``proxy.access`` logger."""

    level: str = "INFO"
    format: str = "auto"
    access_log: bool = True


def _level(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in LEVELS:
        raise ValueError(f"must be one of {', '.join(LEVELS)} (got {value!r})")
    return value.upper()


def parse_logging(raw: Any, problems: list[str]) -> LoggingSettings:
    return v.section(raw, "logging", LoggingSettings, problems, {
        "level": _level, "format": v.one_of(*FORMATS), "access_log": v.boolean})
