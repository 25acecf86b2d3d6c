"""The ``redis`` section (issue #4) and the backend choices that need it.

The URL may hold a password: only :func:`redact`'s form of it is ever logged or shown,
and no problem message quotes it.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from proxy.config import validate as v

BACKENDS = ("memory", "redis")

FAILURE_POLICIES = ("fail_open", "fail_closed")

_SCHEMES = ("redis", "rediss", "unix")

_PASSWORD_QUERY = re.compile(r"(?i)(password=)[^&]*")


@dataclass(frozen=True)
class RedisSettings:
    """The ``redis`` section; ``url`` None: no Redis (a backend that needs it is a
    config error). Kept out of ``repr``: the URL may carry a password."""

    url: str | None = field(default=None, repr=False)
    connect_timeout: float = 0.5
    timeout: float = 0.5  # per command
    retry_interval: float = 1.0
    failure_policy: str = "fail_open"  # rate limits while Redis is down; the cache misses
    key_prefix: str = "proxy:"

    @property
    def safe_url(self) -> str:
        return redact(self.url) if self.url else "(none)"


def parse_redis(raw: Any, problems: list[str]) -> RedisSettings:
    return v.section(raw, "redis", RedisSettings, problems, {
        "url": redis_url, "connect_timeout": v.positive_number,
        "timeout": v.positive_number, "retry_interval": v.positive_number,
        "failure_policy": v.one_of(*FAILURE_POLICIES), "key_prefix": v.string})


def check_backends(settings: RedisSettings, selected: Mapping[str, str],
                   problems: list[str]) -> None:
    """``selected``: key path -> backend (``{"cache.backend": "redis"}``). A Redis
    backend needs ``redis.url`` and the ``redis`` package (checked without importing
    it, so that a config error exits 2 rather than a worker crashing at start)."""
    users = [path for path, backend in selected.items() if backend == "redis"]
    if not users:
        return
    needed_by = " and ".join(f"{path} is redis" for path in users)
    if settings.url is None:
        problems.append(f"redis.url: is required when {needed_by}")
    try:
        installed = importlib.util.find_spec("redis") is not None
    except ValueError:  # in sys.modules without a spec: treat as absent
        installed = False
    if not installed:
        problems.append(f"{users[0]}: redis needs the redis package "
                        "(pip install 'llm-proxy-gateway[redis]')")


def redis_url(value: Any) -> str:
    """A URL redis-py accepts. Problems never quote it: it may hold a password."""
    text = v.string(value)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid URL (its port?)") from None
    if parts.scheme not in _SCHEMES:
        raise ValueError("must start with redis://, rediss:// or unix://")
    if parts.scheme != "unix" and not parts.hostname and port is None:
        raise ValueError("must name a host (redis://host:6379/0)")
    return text


def redact(url: str) -> str:
    """``url`` with its password (user-info or ``?password=``) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        url = url.replace(parts.netloc, f"{parts.username or ''}:***@{host}", 1)
    return _PASSWORD_QUERY.sub(r"\1***", url)
