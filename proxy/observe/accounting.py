"""Usage totals per gateway key and model (issue 10, "Usage accounting").

:meth:`Accounting.observe` is an observer (``observe/observers.py``) of every request: one
whose answer carried or was given a ``usage`` (``observe/usage.py``) adds to its row, keyed by
the gateway key's configured name (None without keys) and the model the client asked
for. Rows count requests, input, output, cached and reasoning tokens, and the requests
whose usage was estimated (no usage came back: a stream cut, a client gone).

* ``usage.backend: memory`` (the default): each worker counts its own since it started;
  ``GET /v1/usage`` sums the workers (``observe/usage_api.py``).
* ``usage.backend: redis``: the same counts are also added in Redis, one hash for every
  worker and host that use it, by a background task every ``flush_interval`` seconds
  and at shutdown. The observer only adds to a dict (it must not block); a flush that
  fails keeps its counts for the next one.

Rows are bounded (``MAX_ROWS`` per worker, then the model is counted as ``other``):
every value comes from the config or from a request that was answered, never unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson
from aiohttp import web

from proxy.config.sections import UsageConfig
from proxy.record import Record
from proxy.state import LIVE
from proxy.stores.redis_link import RedisLink
from proxy.tasks import BackgroundTasks

log = logging.getLogger("proxy.accounting")

FIELDS = ("requests", "input_tokens", "output_tokens", "cached_tokens",
          "reasoning_tokens", "estimated_requests")
MAX_ROWS = 10_000
OTHER = "other"

RowKey = tuple[str | None, str]  # (gateway key name, model)
Rows = dict[RowKey, list[int]]


def add_rows(into: Rows, rows: Iterable[tuple[RowKey, list[int]]]) -> None:
    for key, counts in rows:
        row = _row(into, key)
        for i, count in enumerate(counts):
            row[i] += count


def _row(rows: Rows, key: RowKey) -> list[int]:
    row = rows.get(key)
    if row is None:
        if len(rows) >= MAX_ROWS:
            key = (key[0], OTHER)
            row = rows.get(key)
        if row is None:
            row = rows[key] = [0] * len(FIELDS)
    return row


class Accounting:
    """One worker's totals (``rows``) and, with Redis, what is still to be flushed."""

    def __init__(self, config: UsageConfig, link: RedisLink | None = None):
        self.started = time.time()
        self.rows: Rows = {}
        # The model's name in a row: one the config or discovery knows, else "other"
        # (``app.py`` sets the metrics' rule): a client-chosen string (a ``provider/``
        # prefix routes any name) must not become a row, in memory or in Redis.
        self.model_label: Callable[[str | None], str] = lambda model: model or ""
        self.store = RedisTotals(link, config.flush_interval) \
            if config.backend == "redis" and link is not None else None

    def __repr__(self) -> str:
        return f"<Accounting rows={len(self.rows)} store={self.store!r}>"

    def observe(self, records: list[Record]) -> None:
        """The observer (``observers.Observer``): a few additions per request."""
        tables = (self.rows, self.store.pending) if self.store else (self.rows,)
        label = self.model_label
        for record in records:
            usage = record.usage
            if usage is None:
                continue
            key = (record.key_name, label(record.model))
            estimated = usage.source != "reported"
            counts = (usage.input or 0, usage.output or 0, usage.cached or 0,
                      usage.reasoning or 0)
            for rows in tables:
                row = _row(rows, key)
                row[0] += 1
                row[1] += counts[0]
                row[2] += counts[1]
                row[3] += counts[2]
                row[4] += counts[3]
                row[5] += estimated


class RedisTotals:
    """The totals in Redis: one hash ``<key_prefix>usage`` whose fields are the JSON
    ``[key, model, counter]`` (unambiguous whatever the names hold), and the time the
    totals began under ``<key_prefix>usage:since``."""

    def __init__(self, link: RedisLink, interval: float):
        self._link = link
        self._interval = interval
        self._hash = f"{link.settings.key_prefix}usage"
        self._since = f"{link.settings.key_prefix}usage:since"
        self.pending: Rows = {}
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<RedisTotals {self._link!r} pending={len(self.pending)}>"

    def start(self, tasks: BackgroundTasks) -> None:
        self._task = tasks.spawn(self._run(), name="usage-flush")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def close(self) -> None:
        """Stop the flushing task, then flush what is left (before Redis is closed)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    async def flush(self) -> bool:
        """Add the pending counts in Redis, in one transaction; False if it failed (the
        counts wait for the next flush; a reply lost after Redis applied them counts
        them twice, the price of never losing them)."""
        pending, self.pending = self.pending, {}
        if not pending:
            return True
        if not self._link.usable():
            add_rows(self.pending, pending.items())
            return False
        try:
            async with self._link.client.pipeline(transaction=True) as pipe:
                pipe.set(self._since, int(time.time()), nx=True)
                for (key, model), row in pending.items():
                    for name, count in zip(FIELDS, row, strict=True):
                        if count:
                            pipe.hincrby(self._hash, _field(key, model, name), count)
                await pipe.execute()
        except self._link.errors as exc:
            self._link.failed(exc)
            add_rows(self.pending, pending.items())
            return False
        except BaseException:  # cancelled mid-way (a client of /v1/usage left, shutdown)
            add_rows(self.pending, pending.items())  # wait for the next flush: never lost
            raise
        self._link.succeeded()
        return True

    async def read(self) -> tuple[float, Rows] | None:
        """Every worker's and host's totals, as flushed; None if Redis cannot answer."""
        if not self._link.usable():
            return None
        try:
            since, raw = await asyncio.gather(self._link.client.get(self._since),
                                              self._link.client.hgetall(self._hash))
        except self._link.errors as exc:
            self._link.failed(exc)
            return None
        self._link.succeeded()
        rows: Rows = {}
        for field, value in raw.items():
            parsed = _parse_field(field)
            if parsed is not None:
                key, model, index = parsed
                _row(rows, (key, model))[index] += int(value)
        return (float(since) if since else time.time()), rows


def _field(key: str | None, model: str, counter: str) -> bytes:
    return orjson.dumps([key, model, counter])


def _parse_field(field: bytes | str) -> tuple[str | None, str, int] | None:
    try:
        key, model, counter = orjson.loads(field)
        return key, model, FIELDS.index(counter)
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None  # not written by this gateway


USAGE = web.AppKey("usage", Accounting)


async def usage_lifecycle(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx``: with Redis, flush in the background and once more at shutdown
    (listed after ``app._lifecycle``, so this runs before the tasks and Redis close)."""
    store = app[USAGE].store
    if store is not None:
        store.start(app[LIVE].shared.tasks)
    yield
    if store is not None:
        await store.close()


def as_data(rows: Rows) -> list[dict[str, Any]]:
    """The rows as ``/v1/usage`` lists them, sorted by key and model."""
    return [{"key": key, "model": model, **dict(zip(FIELDS, row, strict=True))}
            for (key, model), row in sorted(rows.items(), key=lambda r: (r[0][0] or "", r[0][1]))]
