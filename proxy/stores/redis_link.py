"""The optional Redis backend (issue #4): its settings, and one worker's link to it.

Rate limits (``auth.limits_backend: redis``) and the response cache (``cache.backend:
redis``) may live in Redis, so that every worker and every host pointed at one Redis
shares them. The ``redis`` package is an extra (``pip install '.[redis]'``) imported
only when a backend uses it, so a gateway without it runs as before.

A :class:`RedisLink` is the worker's connection pool plus what it knows of Redis's
health: short timeouts and no retries (redis-py's default would hold a request for
seconds, and run a rate-limit script twice), and after a failure ``retry_interval``
seconds in which callers fall back at once instead of each waiting for a timeout. The
outage is logged when it starts, at most once a minute while it lasts, and when it ends.
The URL may hold a password: only :func:`redact`'s form of it is ever logged or shown.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from proxy.config import validate as v

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("proxy.redis")

BACKENDS = ("memory", "redis")
FAILURE_POLICIES = ("fail_open", "fail_closed")
_SCHEMES = ("redis", "rediss", "unix")
_LOG_EVERY = 60.0  # seconds between two "still unreachable" warnings
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


class RedisLink:
    """One worker's client and Redis's health as this worker sees it. ``consequence``
    says in the outage warning what the fallback means for this gateway."""

    def __init__(self, settings: RedisSettings, consequence: str,
                 clock: Callable[[], float] = time.monotonic):
        import redis.asyncio  # noqa: PLC0415 - optional: only when a backend uses it
        from redis.asyncio.retry import Retry  # noqa: PLC0415
        from redis.backoff import NoBackoff  # noqa: PLC0415

        assert settings.url is not None
        self.settings = settings
        self._consequence = consequence
        self._clock = clock
        # No retry, for any command: redis-py retries a command whose reply timed out
        # or whose connection broke after it was sent, and a token-bucket script that
        # has run in Redis would then run twice (a double charge: a spurious 429; a
        # double refund: past the limit). The safe retry, before sending, is the pool's
        # own: it finds a pooled connection Redis closed (a restart) and reconnects.
        # redis-py 8 skips that check on RESP3 (for its maintenance notifications):
        # hence RESP2, which also spares Redis 5 the HELLO it does not know. A cache
        # GET/SET could be retried, but one failure only costs a miss.
        self.client: Redis = redis.asyncio.Redis.from_url(
            settings.url, socket_timeout=settings.timeout,
            socket_connect_timeout=settings.connect_timeout,
            retry=Retry(NoBackoff(), 0), protocol=2)
        # A "?protocol=3" in the URL would win over the keyword: RESP2 is not optional.
        self.client.connection_pool.connection_kwargs["protocol"] = 2
        self.errors: tuple[type[BaseException], ...] = (
            redis.exceptions.RedisError, OSError, TimeoutError)
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._next_log = 0.0
        self.fallbacks = 0  # calls that fell back since the outage was last logged

    def __repr__(self) -> str:
        state = "up" if self._down_since is None else "down"
        return f"<RedisLink {self.settings.safe_url} {state}>"

    @property
    def up(self) -> bool:
        return self._down_since is None

    def usable(self) -> bool:
        """Whether to try Redis now: not within ``retry_interval`` of a failure."""
        if self._down_since is None or self._clock() >= self._retry_at:
            return True
        self.fallbacks += 1
        return False

    def failed(self, error: BaseException) -> None:
        now = self._clock()
        self._retry_at = now + self.settings.retry_interval
        self.fallbacks += 1
        if self._down_since is None:
            self._down_since, self._next_log = now, now + _LOG_EVERY
            log.warning("redis %s is unreachable (%s); %s", self.settings.safe_url,
                        self._describe(error), self._consequence)
        elif now >= self._next_log:
            self._next_log = now + _LOG_EVERY
            log.warning("redis %s still unreachable after %.0f s (%d calls fell back)",
                        self.settings.safe_url, now - self._down_since, self.fallbacks)
            self.fallbacks = 0

    def succeeded(self) -> None:
        if self._down_since is not None:
            log.warning("redis %s is reachable again after %.1f s", self.settings.safe_url,
                        self._clock() - self._down_since)
            self._down_since, self.fallbacks = None, 0

    def _describe(self, error: BaseException) -> str:
        """The error's class and message, never the password (if a message ever held
        the URL or a part of it)."""
        text = f"{type(error).__name__}: {error}"
        password = urlsplit(self.settings.url or "").password
        return text.replace(password, "***") if password else text

    async def close(self) -> None:
        await self.client.aclose()
