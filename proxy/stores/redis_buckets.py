"""Token buckets in Redis, shared by every gateway process that uses one Redis.

One Lua script does a whole ``take`` or ``give`` atomically, in one round trip: it reads
each bucket, refills it from Redis's own clock (``TIME``, so hosts whose clocks differ
still agree), and writes only if every bucket has enough. It runs by ``EVALSHA``; redis-py
loads it again when Redis has forgotten it (a restart, ``SCRIPT FLUSH``). A bucket
expires when it would be full again, so idle keys cost Redis nothing: a missing bucket
is a full one.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.resilience.ratelimit import BackendUnavailable, BucketState, Want
from proxy.stores.redis_link import RedisLink

# KEYS: the buckets. ARGV[1]: 'take' (all or nothing) or 'give' (add, at most the
# limit; a negative amount charges more and may leave a debt); then a limit and an
# amount per bucket. Returns the 1-based index of the first bucket that had too little
# (0: none), then each bucket's level after, as strings (Redis turns Lua numbers into
# integers).
TOKEN_BUCKETS = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local take = ARGV[1] == 'take'
local levels, refused = {}, 0
for i, key in ipairs(KEYS) do
  local limit, amount = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local saved = redis.call('HMGET', key, 'tokens', 'at')
  local level = tonumber(saved[1]) or limit
  local elapsed = math.max(0, now - (tonumber(saved[2]) or now))
  level = math.min(limit, level + elapsed * limit / 60)
  if take and refused == 0 and level < amount then refused = i end
  levels[i] = level
end
local out = {refused}
for i, key in ipairs(KEYS) do
  local limit, amount = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  if refused == 0 then
    if take then levels[i] = levels[i] - amount
    else levels[i] = math.min(limit, levels[i] + amount) end
    redis.call('HSET', key, 'tokens', string.format('%.6f', levels[i]),
               'at', string.format('%.6f', now))
    redis.call('PEXPIRE', key, math.ceil((limit - levels[i]) * 60000 / limit) + 1000)
  end
  out[i + 1] = string.format('%.6f', levels[i])
end
return out
"""


class RedisBuckets:
    """``ratelimit.Buckets`` in Redis, under ``<key_prefix>ratelimit:<key>:<rpm|tpm>``."""

    def __init__(self, link: RedisLink):
        self._link = link
        self._script = link.client.register_script(TOKEN_BUCKETS)
        self._prefix = f"{link.settings.key_prefix}ratelimit:"

    def __repr__(self) -> str:
        return f"<RedisBuckets {self._link!r}>"

    async def take(self, wants: Sequence[Want]) -> tuple[int | None, list[BucketState]]:
        refused, levels = await self._run("take", wants)
        return (refused - 1 if refused else None,
                [BucketState.of(limit, level) for (_, limit, _), level
                 in zip(wants, levels, strict=True)])

    async def give(self, bucket: str, limit: int, amount: float) -> None:
        await self._run("give", ((bucket, limit, amount),))

    async def _run(self, mode: str, wants: Sequence[Want]) -> tuple[int, list[float]]:
        link = self._link
        if not link.usable():
            raise BackendUnavailable
        args: list[str | int | float] = [mode]
        for _, limit, amount in wants:
            args += [limit, amount]
        try:
            reply = await self._script(keys=[self._prefix + w[0] for w in wants], args=args)
        except link.errors as error:
            link.failed(error)
            raise BackendUnavailable from error
        link.succeeded()
        return int(reply[0]), [float(level) for level in reply[1:]]
