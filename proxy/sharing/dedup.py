"""In-flight deduplication: identical requests in flight at once share one upstream call.

:class:`InflightRequests` is the futures map: key -> :class:`Exchange`. The first request
with a key leads: it starts the upstream call in a background task (so its own client
leaving does not end the call for the others). Every identical request arriving while
that call is in flight subscribes to the same exchange and receives the same status,
headers and body; an upstream error reaches every subscriber.

An exchange records the answer's chunks as they arrive. Each subscriber reads them at
its own pace from the start, so one that joins late first gets the chunks already
sent, then the live rest. Memory stays bounded by ``max_buffer_bytes`` per exchange:

* chunks every subscriber has read are dropped once the exchange holds more than that
  (from then on it takes no new subscribers, which could not be given the start);
* a subscriber that falls more than that far behind while another one keeps up is cut
  off with an error (an SSE ``error`` event for streams), so a slow client never stalls
  the others;
* when every subscriber is behind (a lone client reading slower than the upstream
  writes, say), the producer waits for them instead: back-pressure towards the
  upstream, as without deduplication.

When the last subscriber leaves before the answer is complete, the upstream call is
cancelled.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from multidict import CIMultiDict

from proxy.answers import Answer
from proxy.errors import FellBehind, GatewayError
from proxy.record import Origin


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    complete: bool
    origin: Origin | None = None


class Exchange:
    """One upstream answer, recorded as it arrives, read by every identical request."""

    def __init__(self, key: bytes, max_buffer_bytes: int):
        self.key = key
        self.task: asyncio.Task[None] | None = None
        self.head: Head | None = None
        self.error: GatewayError | None = None
        self.done = False
        self.joinable = True
        self.total_bytes = 0
        self._max_buffer = max_buffer_bytes
        self._chunks: list[bytes] = []
        self._base = 0  # absolute index of self._chunks[0]
        self._buffered = 0
        self._changed = asyncio.Event()
        self._room = asyncio.Event()
        self._subscribers: set[Subscription] = set()

    def __repr__(self) -> str:
        state = "done" if self.done else "live"
        return (f"<Exchange {state} subscribers={len(self._subscribers)} "
                f"chunks={self._base + len(self._chunks)} bytes={self.total_bytes}>")

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def chunks(self) -> list[bytes]:
        """Every chunk, when nothing was dropped (what the cache stores)."""
        return self._chunks if self._base == 0 else []

    # -- producer side: called by the task that reads the upstream answer
    def set_head(self, head: Head) -> None:
        self.head = head
        self._notify()

    def append(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self.total_bytes += len(chunk)
        self._buffered += len(chunk)
        if self._buffered > self._max_buffer:
            self._trim()
        self._notify()

    async def room(self) -> None:
        """Wait until the buffer is within budget again (every subscriber was behind)."""
        while self._buffered > self._max_buffer and self._subscribers:
            self._room.clear()
            await self._room.wait()
            self._trim()

    def _consumed(self) -> None:
        """A subscriber advanced (or left): the producer may have room again."""
        if self._buffered > self._max_buffer:
            self._room.set()

    def finish(self, error: GatewayError | None = None) -> None:
        self.error = error
        self.done = True
        self._notify()

    # -- consumer side
    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._subscribers.add(subscription)
        return subscription

    def leave(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        if not self._subscribers and not self.done and self.task is not None:
            self.task.cancel()  # nobody is left to receive the answer
            self.joinable = False  # a request arriving now starts its own call
        self._consumed()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _trim(self) -> None:
        """Cut off subscribers too far behind one that keeps up, then drop what every
        remaining subscriber has read."""
        end = self._base + len(self._chunks)
        behind = {s for s in self._subscribers
                  if not s.dropped and self._unread_bytes(s.position, end) > self._max_buffer}
        if any(not s.dropped and s not in behind for s in self._subscribers):
            for subscription in behind:
                subscription.dropped = True
        live = [s.position for s in self._subscribers if not s.dropped]
        keep_from = min(live, default=end)
        drop = keep_from - self._base
        if drop > 0:
            self.joinable = False
            self._buffered -= sum(len(c) for c in self._chunks[:drop])
            del self._chunks[:drop]
            self._base = keep_from

    def _unread_bytes(self, position: int, end: int) -> int:
        start = max(position - self._base, 0)
        return sum(len(c) for c in self._chunks[start:end - self._base])


class Subscription:
    """One request's view of an exchange."""

    def __init__(self, exchange: Exchange):
        self._exchange = exchange
        self.position = exchange._base  # absolute index of the next chunk to read
        self.dropped = False

    async def answer(self) -> Answer:
        """Waits for the status and headers; raises the upstream's error if it failed
        before answering."""
        exchange = self._exchange
        while exchange.head is None:
            if exchange.done:
                raise exchange.error or GatewayError("the shared upstream call ended early")
            await exchange._changed.wait()
        head = exchange.head
        return Answer(head.status, head.reason, CIMultiDict(head.headers), self,
                      complete=head.complete, origin=head.origin)

    async def next(self) -> bytes | None:
        """The next chunk of the shared answer (a ``Body``), waiting for it if needed."""
        exchange = self._exchange
        while True:
            if self.dropped:
                raise FellBehind("This client read the shared answer too slowly and fell "
                                 "too far behind; retry the request.")
            index = self.position - exchange._base
            if index < len(exchange._chunks):
                self.position += 1
                exchange._consumed()
                return exchange._chunks[index]
            if exchange.done:
                if exchange.error is not None:
                    raise exchange.error
                return None
            await exchange._changed.wait()


class InflightRequests:
    """The futures map: key -> the exchange answering it right now."""

    def __init__(self, max_buffer_bytes: int):
        self._exchanges: dict[bytes, Exchange] = {}
        self._max_buffer = max_buffer_bytes
        self.led = 0
        self.followed = 0

    def __repr__(self) -> str:
        return (f"<InflightRequests in_flight={len(self._exchanges)} led={self.led} "
                f"followed={self.followed}>")

    def __len__(self) -> int:
        return len(self._exchanges)

    def join(self, key: bytes) -> Exchange | None:
        exchange = self._exchanges.get(key)
        if exchange is None or not exchange.joinable:
            return None
        self.followed += 1
        return exchange

    def lead(self, key: bytes) -> Exchange:
        exchange = Exchange(key, self._max_buffer)
        self._exchanges[key] = exchange
        self.led += 1
        return exchange

    def settled(self, exchange: Exchange) -> None:
        """The exchange's answer is complete: later requests start a new one."""
        if self._exchanges.get(exchange.key) is exchange:
            del self._exchanges[exchange.key]
