"""Exact-match response cache: in memory, LRU, with a TTL and a byte budget.

Keys come from ``sharing/policy.py`` and always include the caller's identity, so an entry is
never served to another tenant. Streamed answers are stored as the SSE bytes that were
sent and replayed as SSE. Each worker process has its own :class:`ResponseCache` (state
differs per worker; the README says so); ``redis_cache.RedisResponseCache`` is the
shared one. The dispatcher sees either through :class:`AnswerCache`.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from multidict import CIMultiDict

from proxy.answers import Answer, ReplayBody

# Headers that described the original exchange, not the content.
_NOT_REPLAYED = frozenset(("x-request-id", "x-upstream-request-id", "x-gateway-dedup",
                           "x-cache", "x-gateway-overhead-ms", "date"))


class AnswerCache(Protocol):
    """What the dispatcher asks of a cache. Async, so a shared store fits behind it;
    neither method raises: a store that fails answers a miss and stores nothing."""

    async def lookup(self, key: bytes) -> Answer | None:
        """The stored answer, ready to replay; None on a miss."""

    async def store(self, key: bytes, status: int, reason: str,
                    headers: Iterable[tuple[str, str]], chunks: Iterable[bytes]) -> bool:
        """Store a complete answer; False when it was not (too large, store down)."""


def replayable(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The headers a stored answer keeps: those describing the content."""
    return tuple((k, v) for k, v in headers if k.lower() not in _NOT_REPLAYED)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    chunks: tuple[bytes, ...]
    size: int
    expires_at: float

    def replay(self) -> Answer:
        return Answer(self.status, self.reason, CIMultiDict(self.headers),
                      ReplayBody(self.chunks))


class ResponseCache:
    def __init__(self, *, max_bytes: int, ttl: float, max_entry_bytes: int,
                 clock: Callable[[], float] = time.monotonic):
        self._entries: OrderedDict[bytes, CachedAnswer] = OrderedDict()
        self._max_bytes = max_bytes
        self._max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._ttl = ttl
        self._clock = clock
        self.size = 0
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return (f"<ResponseCache entries={len(self._entries)} bytes={self.size}/"
                f"{self._max_bytes} hits={self.hits} misses={self.misses}>")

    def __len__(self) -> int:
        return len(self._entries)

    async def lookup(self, key: bytes) -> Answer | None:
        entry = self.get(key)
        return None if entry is None else entry.replay()

    async def store(self, key: bytes, status: int, reason: str,
                    headers: Iterable[tuple[str, str]], chunks: Iterable[bytes]) -> bool:
        return self.put(key, status, reason, headers, chunks)

    def get(self, key: bytes) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at <= self._clock():
            self._drop(key)
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: bytes, status: int, reason: str,
            headers: Iterable[tuple[str, str]], chunks: Iterable[bytes]) -> bool:
        """Store an answer; ``False`` when it is larger than one entry may be."""
        stored = tuple(chunks)
        kept = replayable(headers)
        size = sum(len(c) for c in stored) + sum(len(k) + len(v) for k, v in kept) + 200
        if size > self._max_entry_bytes:
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = CachedAnswer(status, reason, kept, stored, size,
                                          self._clock() + self._ttl)
        self.size += size
        while self.size > self._max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: bytes) -> None:
        self.size -= self._entries.pop(key).size
