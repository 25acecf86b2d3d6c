"""The optional Redis backend (issue #4): one worker's link to it (its settings:
``config/redis.py``).

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

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from proxy.config.redis import RedisSettings

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("proxy.redis")

_LOG_EVERY = 60.0  # seconds between two "still unreachable" warnings
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
