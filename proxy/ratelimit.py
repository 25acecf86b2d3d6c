"""Per-key rate limits: requests and tokens per minute (issue #4).

Each limited key has two token buckets, one for requests and one for tokens, each as
large as its per-minute limit and refilled continuously at limit/60 per second. A request
takes 1 from the first and its *estimated* tokens from the second (:func:`estimate`); the
estimate is corrected once the answer's ``usage`` is known (:meth:`Admission.settle`).
Over either limit the request gets 429 with ``Retry-After`` and OpenAI's
``x-ratelimit-*`` headers, which every answer to a limited key carries too.

Backends sit behind :class:`Buckets`: :class:`MemoryBuckets` (the default, per worker
process: with N workers a key gets up to N times its limit) and, later, a shared one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.errors import GatewayError
from proxy.keys import GatewayKey

_PROMPT_BYTES_PER_TOKEN = 4  # the usual rule of thumb for English text and JSON


class RateLimited(GatewayError):
    """429 as OpenAI sends it (``rate_limit_exceeded``): SDKs raise ``RateLimitError`` and
    their retry logic honours ``Retry-After``."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float, limit_headers: dict[str, str]):
        super().__init__(message)
        self.retry_after = retry_after
        self.limit_headers = limit_headers

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after))),
                **self.limit_headers}


@dataclass(frozen=True, slots=True)
class BucketState:
    limit: int
    remaining: float
    reset: float  # seconds until the bucket is full again


class Buckets(Protocol):
    """A store of token buckets keyed by name; ``take`` is atomic per bucket."""

    def take(self, bucket: str, limit: int, amount: float) -> tuple[bool, BucketState]:
        """Take ``amount`` if it is there (True), else take nothing (False)."""

    def give(self, bucket: str, limit: int, amount: float) -> None:
        """Return (or, when negative, take more of) ``amount``: an estimate corrected."""


class MemoryBuckets:
    """In-process buckets (one worker's view)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    def __repr__(self) -> str:
        return f"<MemoryBuckets buckets={len(self._buckets)}>"

    def _level(self, bucket: str, limit: int) -> tuple[float, float]:
        now = self._clock()
        tokens, at = self._buckets.get(bucket, (float(limit), now))
        return min(float(limit), tokens + (now - at) * limit / 60.0), now

    def take(self, bucket: str, limit: int, amount: float) -> tuple[bool, BucketState]:
        tokens, now = self._level(bucket, limit)
        taken = tokens >= amount
        if taken:
            tokens -= amount
        self._buckets[bucket] = (tokens, now)
        return taken, BucketState(limit, tokens, (limit - tokens) * 60.0 / limit)

    def give(self, bucket: str, limit: int, amount: float) -> None:
        tokens, now = self._level(bucket, limit)
        self._buckets[bucket] = (min(float(limit), tokens + amount), now)


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

    def settle(self, used_tokens: int | None) -> None:
        """The answer's ``usage.total_tokens`` (None: unknown, the estimate stands). Tokens
        beyond what was taken are charged too: the bucket may go below zero, a debt the
        refill pays before the key's next request."""
        if self._settled or used_tokens is None or self._key.tpm is None:
            return
        self._settled = True
        self._limiter.buckets.give(f"{self._key.name}:tpm", self._key.tpm,
                                   self._taken - used_tokens)


class RateLimiter:
    def __init__(self, buckets: Buckets):
        self.buckets = buckets

    def __repr__(self) -> str:
        return f"<RateLimiter {self.buckets!r}>"

    def admit(self, key: GatewayKey, estimated: int) -> Admission | None:
        """Take one request and ``estimated`` tokens for ``key``, or raise 429."""
        if key.rpm is None and key.tpm is None:
            return None
        headers: dict[str, str] = {}
        need = 0
        if key.rpm is not None:
            ok, state = self.buckets.take(f"{key.name}:rpm", key.rpm, 1)
            headers.update(_headers("requests", state))
            if not ok:
                raise RateLimited(f"Rate limit reached for gateway key '{key.name}': "
                                  f"{key.rpm} requests per minute.",
                                  (1 - state.remaining) * 60.0 / key.rpm, headers)
        if key.tpm is not None:
            need = min(estimated, key.tpm)  # one larger than the limit waits for a full bucket
            ok, state = self.buckets.take(f"{key.name}:tpm", key.tpm, need)
            headers.update(_headers("tokens", state))
            if not ok:
                if key.rpm is not None:  # the request was not made: give its slot back
                    self.buckets.give(f"{key.name}:rpm", key.rpm, 1)
                raise RateLimited(f"Rate limit reached for gateway key '{key.name}': "
                                  f"{key.tpm} tokens per minute (this request: about "
                                  f"{estimated}).", (need - state.remaining) * 60.0 / key.tpm,
                                  headers)
        return Admission(self, key, need, headers)


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
