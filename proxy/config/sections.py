"""The small sections of the configuration (``server``, ``pool``, ``dedup``, ``cache``,
``limits``, ``retries``, ``auth``, ``usage``): frozen values the loader builds once and
every component takes as it is (no settings type of its own to map to).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config import validate as v
from proxy.config.keys import GatewayKey


@dataclass(frozen=True)
class ServerConfig:
    """``workers`` > 1 runs that many processes (``server/supervisor.py``); with ``socket_dir`` set
    each worker also listens on ``<socket_dir>/worker-<i>.sock`` (for nginx and peers)."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 32 * 1024 * 1024
    workers: int = 1
    socket_dir: str | None = None
    socket_mode: int = 0o666  # the sockets' file mode; YAML: an octal string, "0660"
    # SIGTERM: in-flight requests and streams may finish for this long, then are cut.
    shutdown_grace: float = 30.0
    # What a client connection may cost (``server/guard.py``): request line + headers,
    # seconds to send a head and a body, idle keep-alive (longer than nginx's upstream
    # keepalive_timeout of 60 s, so nginx never reuses a connection being closed), and
    # open connections per worker.
    max_header_bytes: int = 32 * 1024
    header_timeout: float = 15.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_connections: int = 4096


@dataclass(frozen=True)
class PoolConfig:
    """The one shared upstream connection pool of a worker."""

    limit: int = 1024
    keepalive_timeout: float = 30.0


@dataclass(frozen=True)
class DedupConfig:
    """In-flight deduplication (``sharing/dedup.py``); ``mode``: deterministic | all | off."""

    mode: str = "deterministic"
    max_buffer_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class CacheConfig:
    """The exact-match response cache (``sharing/cache.py``): per worker, or ``backend: redis``
    shared (``stores/redis_cache.py``; Redis bounds its size, not ``max_bytes``)."""

    enabled: bool = True
    backend: str = "memory"
    ttl: float = 300.0
    max_bytes: int = 64 * 1024 * 1024
    max_entry_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class LimitsConfig:
    """Each provider's adaptive concurrency limit (``resilience/concurrency.py``): the
    controller keeps it within [min, max], starting at ``initial`` (None: ``max``);
    requests over it wait up to ``queue_timeout`` seconds in a queue of ``queue_size``,
    then get 503 + Retry-After."""

    initial: int | None = None
    min: int = 4
    max: int = 1024
    queue_size: int = 1024
    queue_timeout: float = 2.0
    backoff: float = 0.9  # the share of the requests in flight kept on 429/503/errors
    forget_after: float = 10.0  # seconds a lowered limit holds without fresh evidence

    @property
    def start(self) -> int:
        """``initial`` None: start at ``max`` (issue 9: no limit until evidence arrives)."""
        return self.max if self.initial is None else self.initial


@dataclass(frozen=True)
class RetryConfig:
    """Upstream retries (``resilience/retry.py``): attempts in all, full-jitter backoff bounds,
    the longest ``Retry-After`` honoured, and the share of requests that may retry."""

    max_attempts: int = 3
    base_delay: float = 0.25
    max_delay: float = 8.0
    max_retry_after: float = 30.0
    budget: float = 0.2


@dataclass(frozen=True)
class AuthConfig:
    """Gateway keys (``config/keys.py``); none: the gateway is open (logged at start-up).
    ``limits_backend``: where their rate limits are counted (``stores/backends.py``)."""

    keys: tuple[GatewayKey, ...] = ()
    limits_backend: str = "memory"
    # ``keys: []`` written out: no keys, on purpose. Only then may a reload remove
    # every key of a running gateway (``gateway.py``): a file that merely lost its
    # ``auth`` section must not open the gateway to anyone.
    open_on_purpose: bool = False


@dataclass(frozen=True)
class UsageConfig:
    """Usage totals (``observe/accounting.py``): per worker, or in Redis every flush_interval s."""

    backend: str = "memory"
    flush_interval: float = 1.0

# Keys of the latency gradient issue 9 removed: named in the error, not just "unknown".
_RETIRED_LIMITS = ("tolerance", "slack")


def parse_limits(raw: Any, problems: list[str]) -> LimitsConfig:
    if isinstance(raw, dict):
        for key in _RETIRED_LIMITS:
            if key in raw:
                problems.append(f"limits.{key}: no longer exists: the limit no longer "
                                "follows latency, only 429/503 and connection errors; "
                                "remove it")
        raw = {k: val for k, val in raw.items() if k not in _RETIRED_LIMITS}
    limits = v.section(raw, "limits", LimitsConfig, problems, {
        "initial": v.positive_int, "min": v.positive_int, "max": v.positive_int,
        "queue_size": v.non_negative_int, "queue_timeout": v.positive_number,
        "backoff": v.fraction, "forget_after": v.positive_number})
    if limits.max < limits.min:
        problems.append("limits.max: must not be below limits.min")
    elif not limits.min <= limits.start <= limits.max:
        problems.append("limits.initial: must be between limits.min and limits.max")
    return limits
