"""The response cache in Redis, shared by every gateway process that uses one Redis.

An entry is one Redis string under ``<key_prefix>cache:<hex key>``, set with the
cache's TTL (Redis expires it; its ``maxmemory`` policy, not ``cache.max_bytes``, bounds
the whole). Its framing: a version byte, the head's length (4 bytes, big-endian), the
head as orjson (``[status, reason, [[name, value], ...]]``: short text, which JSON suits
and orjson already parses), then the body's raw bytes. Raw rather than base64 in JSON: no
third more bytes, no encoding pass over a large body, and an SSE body is stored exactly
as it was sent.

Redis failing never fails a request: a lookup answers a miss, a store stores nothing,
and ``RedisLink`` logs the outage (rate-limited). Nor does an entry this gateway cannot
read (another version, or garbage: Redis is shared, and anything may write there): it is
a miss, logged at most once a minute and never quoted, and the answer then stored
replaces it.
"""

from __future__ import annotations

import logging
import re
import struct
import time
from collections.abc import Iterable
from typing import Any

import orjson
from multidict import CIMultiDict

from proxy.answers import Answer, ReplayBody
from proxy.sharing.cache import replayable
from proxy.stores.redis_link import RedisLink

log = logging.getLogger("proxy.redis")

_VERSION = b"\x01"
_HEAD_LENGTH = struct.Struct(">I")
_BODY_AT = len(_VERSION) + _HEAD_LENGTH.size
_LOG_EVERY = 60.0  # seconds between two warnings about unreadable entries
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a header name (RFC 9110)
_TEXT = re.compile(r"[^\r\n\x00]*")  # a reason or header value aiohttp will send


def encode(status: int, reason: str, headers: tuple[tuple[str, str], ...], body: bytes
           ) -> bytes:
    head = orjson.dumps([status, reason, headers])
    return b"".join((_VERSION, _HEAD_LENGTH.pack(len(head)), head, body))


def decode(frame: bytes) -> Answer | None:
    """The answer a frame holds; None for one this version cannot read: another
    version, a truncated frame, a head not of the shape ``encode`` writes."""
    if not frame.startswith(_VERSION) or len(frame) < _BODY_AT:
        return None
    (length,) = _HEAD_LENGTH.unpack_from(frame, len(_VERSION))
    if _BODY_AT + length > len(frame):
        return None
    try:
        head = _head(orjson.loads(frame[_BODY_AT:_BODY_AT + length]))
    except ValueError:  # not JSON
        return None
    if head is None:
        return None
    status, reason, headers = head
    body = frame[_BODY_AT + length:]
    return Answer(status, reason, CIMultiDict(headers), ReplayBody((body,)))


def _head(value: Any) -> tuple[int, str, list[tuple[str, str]]] | None:
    """``[status, reason, [[name, value], ...]]``, each part one aiohttp will send."""
    if not isinstance(value, list) or len(value) != 3:
        return None
    status, reason, pairs = value
    if (type(status) is not int or not 100 <= status <= 599
            or not isinstance(reason, str) or not _TEXT.fullmatch(reason)
            or not isinstance(pairs, list)):
        return None
    headers: list[tuple[str, str]] = []
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)
                and isinstance(pair[1], str) and _TOKEN.fullmatch(pair[0])
                and _TEXT.fullmatch(pair[1])):
            return None
        headers.append((pair[0], pair[1]))
    return status, reason, headers


class RedisResponseCache:
    """``cache.AnswerCache`` in Redis; ``hits``/``misses`` are this worker's."""

    def __init__(self, link: RedisLink, *, ttl: float, max_entry_bytes: int):
        self._link = link
        self._prefix = f"{link.settings.key_prefix}cache:"
        self._ttl_ms = max(1, round(ttl * 1000))
        self._max_entry_bytes = max_entry_bytes
        self.hits = 0
        self.misses = 0
        self._unreadable = 0  # since the last warning
        self._next_warning = 0.0

    def __repr__(self) -> str:
        return f"<RedisResponseCache {self._link!r} hits={self.hits} misses={self.misses}>"

    async def lookup(self, key: bytes) -> Answer | None:
        link = self._link
        frame: bytes | str | None = None  # str only if decode_responses were on
        if link.usable():
            try:
                frame = await link.client.get(self._prefix + key.hex())
            except link.errors as error:
                link.failed(error)
            else:
                link.succeeded()
        answer = decode(frame) if isinstance(frame, bytes) and frame else None
        if answer is None:
            self.misses += 1
            if frame:
                self._warn_unreadable()
        else:
            self.hits += 1
        return answer

    def _warn_unreadable(self) -> None:
        """At most once a minute; never the entry (it holds someone's answer)."""
        self._unreadable += 1
        now = time.monotonic()
        if now >= self._next_warning:
            self._next_warning = now + _LOG_EVERY
            log.warning("redis cache: %d entries cannot be read (another version, or "
                        "malformed); served from the upstream as misses", self._unreadable)
            self._unreadable = 0

    async def store(self, key: bytes, status: int, reason: str,
                    headers: Iterable[tuple[str, str]], chunks: Iterable[bytes]) -> bool:
        frame = encode(status, reason, replayable(headers), b"".join(chunks))
        link = self._link
        if len(frame) > self._max_entry_bytes or not link.usable():
            return False
        try:
            await link.client.set(self._prefix + key.hex(), frame, px=self._ttl_ms)
        except link.errors as error:
            link.failed(error)
            return False
        link.succeeded()
        return True
