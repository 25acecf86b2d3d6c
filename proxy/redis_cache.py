"""The response cache in Redis, shared by every gateway process that uses one Redis.

An entry is one Redis string under ``<key_prefix>cache:<hex key>``, set with the
cache's TTL (Redis expires it; its ``maxmemory`` policy, not ``cache.max_bytes``, bounds
the whole). Its framing: a version byte, the head's length (4 bytes, big-endian), the
head as orjson (``[status, reason, [[name, value], ...]]``: short text, which JSON suits
and orjson already parses), then the body's raw bytes. Raw rather than base64 in JSON: no
third more bytes, no encoding pass over a large body, and an SSE body is stored exactly
as it was sent.

Redis failing never fails a request: a lookup answers a miss, a store stores nothing,
and ``RedisLink`` logs the outage (rate-limited).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

import orjson
from multidict import CIMultiDict

from proxy.answers import Answer, ReplayBody
from proxy.cache import replayable
from proxy.redis_store import RedisLink

_VERSION = b"\x01"
_HEAD_LENGTH = struct.Struct(">I")
_BODY_AT = len(_VERSION) + _HEAD_LENGTH.size


def encode(status: int, reason: str, headers: tuple[tuple[str, str], ...], body: bytes
           ) -> bytes:
    head = orjson.dumps([status, reason, headers])
    return b"".join((_VERSION, _HEAD_LENGTH.pack(len(head)), head, body))


def decode(frame: bytes) -> Answer | None:
    """The answer a frame holds; None for one this version cannot read."""
    if not frame.startswith(_VERSION) or len(frame) < _BODY_AT:
        return None
    (length,) = _HEAD_LENGTH.unpack_from(frame, len(_VERSION))
    try:
        status, reason, headers = orjson.loads(frame[_BODY_AT:_BODY_AT + length])
    except (ValueError, TypeError):  # not JSON, or not its shape
        return None
    body = frame[_BODY_AT + length:]
    return Answer(status, reason, CIMultiDict((k, v) for k, v in headers), ReplayBody((body,)))


class RedisResponseCache:
    """``cache.AnswerCache`` in Redis; ``hits``/``misses`` are this worker's."""

    def __init__(self, link: RedisLink, *, ttl: float, max_entry_bytes: int):
        self._link = link
        self._prefix = f"{link.settings.key_prefix}cache:"
        self._ttl_ms = max(1, round(ttl * 1000))
        self._max_entry_bytes = max_entry_bytes
        self.hits = 0
        self.misses = 0

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
        else:
            self.hits += 1
        return answer

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
