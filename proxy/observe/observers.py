"""The observers of ended requests, told in batches (issue 10: under 10 % of the
gateway's per-request CPU for everything it added).

``core.Core`` hands each ended request's ``Record`` to :meth:`Observers.ended`,
which only appends it to a list. Every ``BATCH`` records, or ``AFTER`` seconds after the
first of a batch (a timer on the running event loop), each observer is handed the
whole batch in turn: the usage still to be read (``usage.read_deferred``), the metrics,
the usage accounting, the access log, in that order (later ones read what earlier ones
fill). Measured in a running gateway, observing each request as it ended cost about
three times what the same work costs in a loop: between requests, the observers' code
and data fall out of the CPU's caches; a loop over a batch keeps them in. A batch holds
the loop while it runs, so it is small (issue 11): at 1,000 req/s a batch of 64 took
1.6 ms (24 us a record), one stall every 64 ms that every request ready meanwhile
waited out (the gateway's added p99); a batch of 16 takes 0.3 ms (18 us a record).

Whoever reports what the observers hold (a scrape, ``/v1/usage``, the status page)
calls :meth:`Observers.flush` first, so this worker's own figures are exact; a record
waits at most ``AFTER`` seconds otherwise. A worker killed loses at most that batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from aiohttp import web

from proxy.record import Record

log = logging.getLogger("proxy.observers")

# Called with each batch of ended requests, whatever their outcome; must not block (an
# observer that needs I/O hands the figures to its own background work).
Observer = Callable[[list[Record]], None]


class Observers:
    """The app's observers (``app.py``) and the batch of records they are still to see."""

    BATCH = 16
    AFTER = 0.1

    __slots__ = ("_batch", "_timer", "observers")

    def __init__(self, observers: Iterable[Observer] = ()):
        self.observers: list[Observer] = list(observers)
        self._batch: list[Record] = []
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<Observers {len(self.observers)} waiting={len(self._batch)}>"

    def ended(self, record: Record) -> None:
        """One ended request: the only work done on the request's own path."""
        batch = self._batch
        batch.append(record)
        if len(batch) >= self.BATCH:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().call_later(self.AFTER, self.flush)
            except RuntimeError:  # no loop (a test calling it directly): at once
                self.flush()

    def flush(self) -> None:
        """Hand the waiting records to every observer; one that fails does not keep
        the others from theirs."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        for observer in self.observers:
            try:
                observer(batch)
            except Exception:
                log.exception("observer %r failed", observer)

    async def cleanup(self, app: object) -> None:
        """``on_cleanup``: the records still waiting, once every request has ended."""
        self.flush()


# Told of every request once it has ended (the access log, metrics, usage): ``app.py``.
OBSERVERS = web.AppKey("observers", Observers)
