"""Which store holds the rate limits and the response cache: this worker's memory (the
default) or Redis, shared by every worker and host pointed at it (``stores/redis_link.py``).

``app.py`` asks here once per worker; nothing imports ``redis`` unless a backend uses it.
"""

from __future__ import annotations

from proxy.config.loader import Config
from proxy.resilience.ratelimit import MemoryBuckets, RateLimiter
from proxy.sharing.cache import AnswerCache, ResponseCache
from proxy.stores.redis_buckets import RedisBuckets
from proxy.stores.redis_cache import RedisResponseCache
from proxy.stores.redis_link import RedisLink


def redis_link(config: Config) -> RedisLink | None:
    """The worker's link to Redis, when a backend uses it (close it at shutdown)."""
    limits = config.auth.limits_backend == "redis"
    cache = config.cache.enabled and config.cache.backend == "redis"
    usage = config.usage.backend == "redis"
    if not (limits or cache or usage):
        return None
    fallbacks = []
    if limits:
        fallbacks.append("rate-limited keys get 503 (failure_policy fail_closed)"
                         if config.redis.failure_policy == "fail_closed" else
                         "rate-limited keys are admitted without limits (failure_policy "
                         "fail_open)")
    if cache:
        fallbacks.append("the cache answers misses")
    if usage:
        fallbacks.append("usage totals wait in memory")
    return RedisLink(config.redis, "; ".join(fallbacks) + " until it is back")


def rate_limiter(config: Config, link: RedisLink | None) -> RateLimiter:
    if config.auth.limits_backend == "redis" and link is not None:
        return RateLimiter(RedisBuckets(link),
                           fail_closed=config.redis.failure_policy == "fail_closed",
                           retry_after=config.redis.retry_interval)
    return RateLimiter(MemoryBuckets())


def response_cache(config: Config, link: RedisLink | None) -> AnswerCache:
    cache = config.cache
    if cache.backend == "redis" and link is not None:
        return RedisResponseCache(link, ttl=cache.ttl, max_entry_bytes=cache.max_entry_bytes)
    return ResponseCache(max_bytes=cache.max_bytes, ttl=cache.ttl,
                         max_entry_bytes=cache.max_entry_bytes)
