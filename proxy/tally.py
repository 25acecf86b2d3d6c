"""Counters, gauges and histograms cheap enough to update on every request, exported
through ``prometheus-client`` (its metric families and text format), correct across
``--workers N``.

Why not prometheus-client's own metric objects: measured on this machine, its
``labels(...).inc()`` / ``observe()`` cost 9 us per request for the gateway's set of
metrics in memory and 13 us in its multiprocess mode (an mmap write per value), against
a gateway that spends about 180 us per request in all; plain dicts and ``bisect`` do
the same bookkeeping in about 1 us (bench/RESULTS.md, "Operator visibility").

The families have prometheus-client's shape (``labels(*values)`` -> a child with
``inc``/``set``/``observe``), and a :class:`Tally` is a prometheus-client collector:
``generate_latest`` renders it, ``text_string_to_metric_families`` parses the result.

Across workers (``workers.py``): each worker writes its whole tally to its own file in
a directory the supervisor made for this gateway instance (``FILE_SUFFIX``), every
``flush_interval`` seconds, before it answers a scrape, and at shutdown; a scrape sums
every file of the directory. Counters and histograms of a worker that died stay in the
sum (its file stays, renamed ``*.dead`` by the supervisor), so they never go backwards;
its gauges leave the sum. A worker answering a scrape flushes its own file first, so
what one scrape saw is always on disk for the next, whichever worker answers it.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

FILE_SUFFIX = ".tally"
DEAD_SUFFIX = ".dead"  # a worker that exited: its counters count, its gauges do not
Labels = tuple[str, ...]


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class GaugeChild(CounterChild):
    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = value

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class HistogramChild:
    __slots__ = ("buckets", "counts", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value


class Family:
    """One metric name and its children by label values (made on first use)."""

    kind = ""

    def __init__(self, tally: Tally, name: str, documentation: str,
                 labelnames: Sequence[str] = ()):
        self.name, self.documentation = name, documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[Labels, Any] = {}
        tally.add(self)

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: labels {self.labelnames}, given {values}")
            child = self.children[values] = self._child()
        return child

    def _child(self) -> Any:
        raise NotImplementedError

    def state(self) -> list[Any]:
        """The children's values, for the worker's file: ``[[labels, value], ...]``."""
        return [[list(labels), child.value] for labels, child in self.children.items()]


class Counter(Family):
    kind = "counter"

    def _child(self) -> CounterChild:
        return CounterChild()

    def labels(self, *values: str) -> CounterChild:
        child: CounterChild = super().labels(*values)
        return child


class Gauge(Family):
    kind = "gauge"

    def _child(self) -> GaugeChild:
        return GaugeChild()

    def labels(self, *values: str) -> GaugeChild:
        child: GaugeChild = super().labels(*values)
        return child


class Histogram(Family):
    kind = "histogram"

    def __init__(self, tally: Tally, name: str, documentation: str,
                 labelnames: Sequence[str] = (), *, buckets: Sequence[float]):
        self.buckets = tuple(sorted(buckets))
        super().__init__(tally, name, documentation, labelnames)

    def _child(self) -> HistogramChild:
        return HistogramChild(self.buckets)

    def labels(self, *values: str) -> HistogramChild:
        child: HistogramChild = super().labels(*values)
        return child

    def state(self) -> list[Any]:
        return [[list(labels), [*child.counts, child.sum]]
                for labels, child in self.children.items()]


class Tally:
    """Every family of one gateway app; a prometheus-client collector. ``directory``:
    where this gateway's workers keep their files (None: one process, nothing shared)."""

    def __init__(self, directory: Path | None = None, name: str = ""):
        self.families: dict[str, Family] = {}
        self.directory = directory
        # This worker's file: named by its pid, so a restarted worker never writes over
        # the file of the one it replaces.
        self.file = (directory / f"{name or 'worker'}-{os.getpid()}{FILE_SUFFIX}"
                     if directory is not None else None)

    def add(self, family: Family) -> None:
        if family.name in self.families:
            raise ValueError(f"metric {family.name} defined twice")
        self.families[family.name] = family

    def flush(self) -> None:
        """Write this worker's tally to its file, atomically (a reader never sees half)."""
        if self.file is None:
            return
        state = {name: f.state() for name, f in self.families.items()}
        partial = self.file.with_suffix(".partial")
        partial.write_bytes(orjson.dumps(state))
        partial.replace(self.file)

    def collect(self) -> Iterator[Metric]:
        """The families with every worker's values summed (the collector interface)."""
        states = self._states()
        for name, family in self.families.items():
            yield _family_metric(family, [(live, state.get(name, ()))
                                          for live, state in states])

    def _states(self) -> list[tuple[bool, dict[str, Any]]]:
        """(alive, state) of every worker: this one's own, read from memory when it
        has no file; else every file in the directory, this one's flushed first."""
        if self.directory is None:
            return [(True, {name: f.state() for name, f in self.families.items()})]
        self.flush()
        states = []
        for path in sorted(self.directory.iterdir()):
            if path.suffix not in (FILE_SUFFIX, DEAD_SUFFIX):
                continue
            with contextlib.suppress(OSError, orjson.JSONDecodeError):
                states.append((path.suffix == FILE_SUFFIX, orjson.loads(path.read_bytes())))
        return states


def _family_metric(family: Family, states: Iterable[tuple[bool, Any]]) -> Metric:
    """One prometheus-client metric family, the workers' values summed per labels."""
    summed: dict[Labels, Any] = {}
    for live, children in states:
        if family.kind == "gauge" and not live:
            continue
        for labels, value in children:
            key = tuple(labels)
            if isinstance(value, list):
                before = summed.get(key)
                summed[key] = value if before is None else [
                    a + b for a, b in zip(before, value, strict=True)]
            else:
                summed[key] = summed.get(key, 0.0) + value
    names = list(family.labelnames)
    if family.kind == "histogram":
        return _histogram_metric(family, names, summed)
    metric: CounterMetricFamily | GaugeMetricFamily = (
        CounterMetricFamily(family.name, family.documentation, labels=names)
        if family.kind == "counter"
        else GaugeMetricFamily(family.name, family.documentation, labels=names))
    for key, value in summed.items():
        metric.add_metric(list(key), value)
    return metric


def _histogram_metric(family: Family, names: list[str], summed: dict[Labels, Any]
                      ) -> Metric:
    assert isinstance(family, Histogram)
    metric = HistogramMetricFamily(family.name, family.documentation, labels=names)
    bounds = [*(_bound(b) for b in family.buckets), "+Inf"]
    for key, value in summed.items():
        *counts, total = value
        cumulative, running = [], 0
        for bound, count in zip(bounds, counts, strict=True):
            running += count
            cumulative.append((bound, running))
        metric.add_metric(list(key), cumulative, total)
    return metric


def _bound(value: float) -> str:
    return repr(float(value))


def mark_dead(directory: Path, pid: int) -> None:
    """The supervisor's part: a worker exited, so its gauges leave the sum (its
    counters stay: a restart must not make them go backwards)."""
    for path in directory.glob(f"*-{pid}{FILE_SUFFIX}"):
        with contextlib.suppress(OSError):
            path.rename(path.with_suffix(DEAD_SUFFIX))
