"""Per-key rate limits: requests and tokens per minute (issue #4).

Each limited key has two token buckets, one for requests and one for tokens, each as
large as its per-minute limit and refilled continuously at limit/60 per second. A request
takes 1 from the first and its *estimated* tokens from the second (:func:`estimate`), both
or neither; the estimate is corrected once the answer's ``usage`` is known
(:meth:`Admission.settle`). Over either limit the request gets 429 with ``Retry-After``
and OpenAI's ``x-ratelimit-*`` headers, which every answer to a limited key carries too.

Backends sit behind :class:`Buckets`: :class:`MemoryBuckets` (the default, per worker
process: with N workers a key gets up to N times its limit) and
``redis_buckets.RedisBuckets``, shared by every worker and host that use one Redis. A
backend that cannot answer raises :class:`BackendUnavailable`; the limiter then admits
the request unlimited (``fail_open``) or refuses it with 503 (``fail_closed``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.config.keys import GatewayKey
from proxy.errors import LimitsUnavailable, RateLimited

_PROMPT_BYTES_PER_TOKEN = 4  # the usual rule of thumb for English text and JSON


class BackendUnavailable(Exception):
    """A bucket store could not answer (its own module has logged why)."""


@dataclass(frozen=True, slots=True)
class BucketState:
    limit: int
    remaining: float
    reset: float  # seconds until the bucket is full again

    @classmethod
    def of(cls, limit: int, level: float) -> BucketState:
        return cls(limit, level, (limit - level) * 60.0 / limit)


Want = tuple[str, int, float]  # a bucket's name, its limit, the amount to take


class Buckets(Protocol):
    """A store of token buckets keyed by name. Async, so a shared store fits behind it;
    the memory one never suspends."""

    async def take(self, wants: Sequence[Want]) -> tuple[int | None, list[BucketState]]:
        """Take every amount if every bucket holds it, else nothing, atomically. Returns
        the index of the first bucket that had too little (None: all taken) and each
        bucket's state after. Raises :class:`BackendUnavailable`."""

    async def give(self, bucket: str, limit: int, amount: float) -> None:
        """Return (or, when negative, take more of) ``amount``: an estimate corrected.
        Raises :class:`BackendUnavailable`."""


class MemoryBuckets:
    """In-process buckets (one worker's view)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    def __repr__(self) -> str:
        return f"<MemoryBuckets buckets={len(self._buckets)}>"

    def _level(self, bucket: str, limit: int, now: float) -> float:
        tokens, at = self._buckets.get(bucket, (float(limit), now))
        return min(float(limit), tokens + (now - at) * limit / 60.0)

    async def take(self, wants: Sequence[Want]) -> tuple[int | None, list[BucketState]]:
        now = self._clock()
        levels: list[float] = []
        refused: int | None = None
        for bucket, limit, amount in wants:  # plain loops: this runs on every request
            level = self._level(bucket, limit, now)
            if refused is None and level < amount:
                refused = len(levels)
            levels.append(level)
        states: list[BucketState] = []
        for (bucket, limit, amount), level in zip(wants, levels, strict=True):
            after = level if refused is not None else level - amount
            if refused is None:
                self._buckets[bucket] = (after, now)
            states.append(BucketState.of(limit, after))
        return refused, states

    async def give(self, bucket: str, limit: int, amount: float) -> None:
        now = self._clock()
        self._buckets[bucket] = (min(float(limit), self._level(bucket, limit, now) + amount),
                                 now)


def estimate(payload: dict[str, Any] | None, body: bytes) -> int:
    """Tokens a request may cost before its answer says: the prompt by size, plus the
    completion it allows (``max_tokens``/``max_completion_tokens``/``max_output_tokens``)."""
    prompt = len(body) // _PROMPT_BYTES_PER_TOKEN + 1
    if not payload:
        return prompt
    for field in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = payload.get(field)
        if isinstance(value, int) and value > 0:
            return prompt + value
    return prompt


class Admission:
    """One admitted request of a limited key: its headers, and the correction to make
    once the real token count is known."""

    def __init__(self, limiter: RateLimiter, key: GatewayKey, taken: int,
                 headers: dict[str, str]):
        self._limiter = limiter
        self._key = key
        self._taken = taken  # tokens taken for it (the estimate, at most the limit)
        self.headers = headers
        self._settled = False

    async def settle(self, used_tokens: int | None) -> None:
        """The answer's ``usage.total_tokens`` (None: unknown, the estimate stands). Tokens
        beyond what was taken are charged too: the bucket may go below zero, a debt the
        refill pays before the key's next request."""
        if self._settled or used_tokens is None or self._key.tpm is None:
            return
        self._settled = True
        with contextlib.suppress(BackendUnavailable):  # the store is down: it stands
            await self._limiter.buckets.give(f"{self._key.name}:tpm", self._key.tpm,
                                             self._taken - used_tokens)


class RateLimiter:
    """``fail_closed``: what a request of a limited key gets while ``buckets`` cannot
    answer; False admits it unlimited (the backend logs the outage), True refuses it
    with :class:`LimitsUnavailable` and ``retry_after``."""

    def __init__(self, buckets: Buckets, *, fail_closed: bool = False,
                 retry_after: float = 1.0):
        self.buckets = buckets
        self._fail_closed = fail_closed
        self._retry_after = retry_after

    def __repr__(self) -> str:
        policy = "fail_closed" if self._fail_closed else "fail_open"
        return f"<RateLimiter {self.buckets!r} {policy}>"

    async def admit(self, key: GatewayKey, estimated: int) -> Admission | None:
        """Take one request and ``estimated`` tokens for ``key``, or raise 429. A token
        estimate larger than the limit waits for a full bucket."""
        if key.rpm is None and key.tpm is None:
            return None
        need = min(estimated, key.tpm) if key.tpm is not None else 0
        wants: list[Want] = []
        kinds: list[str] = []  # each bucket's name in the x-ratelimit-* headers
        if key.rpm is not None:
            wants.append((f"{key.name}:rpm", key.rpm, 1))
            kinds.append("requests")
        if key.tpm is not None:
            wants.append((f"{key.name}:tpm", key.tpm, need))
            kinds.append("tokens")
        try:
            refused, states = await self.buckets.take(wants)
        except BackendUnavailable:
            if self._fail_closed:
                raise LimitsUnavailable(self._retry_after) from None
            return None
        headers: dict[str, str] = {}
        for kind, state in zip(kinds, states, strict=True):
            headers.update(_headers(kind, state))
        if refused is not None:
            raise _refusal(key, wants[refused], states[refused], estimated, headers)
        return Admission(self, key, need, headers)


def _refusal(key: GatewayKey, want: Want, state: BucketState, estimated: int,
             headers: dict[str, str]) -> RateLimited:
    bucket, limit, amount = want
    wait = (amount - state.remaining) * 60.0 / limit
    if bucket.endswith(":rpm"):
        return RateLimited(f"Rate limit reached for gateway key '{key.name}': "
                           f"{limit} requests per minute.", wait, headers)
    return RateLimited(f"Rate limit reached for gateway key '{key.name}': {limit} tokens "
                       f"per minute (this request: about {estimated}).", wait, headers)


def _headers(kind: str, state: BucketState) -> dict[str, str]:
    return {f"x-ratelimit-limit-{kind}": str(state.limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(state.remaining))),
            f"x-ratelimit-reset-{kind}": _duration(state.reset)}


def _duration(seconds: float) -> str:
    """OpenAI's format for reset times: ``1s``, ``6m0s``, ``250ms``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s" if minutes else f"{rest:.3g}s"
