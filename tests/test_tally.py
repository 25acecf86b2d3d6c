"""``proxy/tally.py``: the metric families' bookkeeping, and their sum across workers'
files, read back through prometheus-client's own text format and parser."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.tally import Counter, Gauge, Histogram, Tally, mark_dead


def scrape(tally: Tally) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    registry = CollectorRegistry()
    registry.register(tally)
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


class Worker:
    def __init__(self, directory: Path | None, name: str):
        self.tally = Tally(directory, name)
        self.requests = Counter(self.tally, "gateway_requests", "Requests.", ("status",))
        self.seconds = Histogram(self.tally, "duration_seconds", "Durations.",
                                 buckets=(0.1, 1.0))
        self.busy = Gauge(self.tally, "in_flight", "Busy.")


def test_one_process_counts_without_a_directory() -> None:
    worker = Worker(None, "solo")
    worker.requests.labels("200").inc()
    worker.requests.labels("200").inc(2)
    for value in (0.05, 0.1, 0.5, 7.0):  # 0.1 is inside le="0.1": buckets are <=
        worker.seconds.labels().observe(value)
    worker.busy.labels().set(3)
    samples = scrape(worker.tally)
    assert samples["gateway_requests_total"] == {(("status", "200"),): 3.0}
    assert samples["duration_seconds_bucket"] == {
        (("le", "0.1"),): 2.0, (("le", "1.0"),): 3.0, (("le", "+Inf"),): 4.0}
    assert samples["duration_seconds_count"] == {(): 4.0}
    assert samples["duration_seconds_sum"] == {(): pytest.approx(7.65)}
    assert samples["in_flight"] == {(): 3.0}


def test_workers_are_summed_and_a_dead_ones_counters_stay(tmp_path: Path) -> None:
    first, second = Worker(tmp_path, "a"), Worker(tmp_path, "b")
    second.tally.file = tmp_path / "b-999999.tally"  # another process, by its pid
    first.requests.labels("200").inc(2)
    second.requests.labels("200").inc(3)
    second.requests.labels("500").inc()
    first.seconds.labels().observe(0.5)
    second.seconds.labels().observe(5.0)
    first.busy.labels().set(1)
    second.busy.labels().set(4)
    second.tally.flush()
    samples = scrape(first.tally)
    assert samples["gateway_requests_total"] == {
        (("status", "200"),): 5.0, (("status", "500"),): 1.0}
    assert samples["duration_seconds_bucket"][(("le", "+Inf"),)] == 2.0
    assert samples["in_flight"] == {(): 5.0}
    mark_dead(tmp_path, 999999)  # the supervisor saw it exit
    samples = scrape(first.tally)
    assert samples["gateway_requests_total"][(("status", "200"),)] == 5.0  # not backwards
    assert samples["in_flight"] == {(): 1.0}  # a dead worker is busy with nothing


def test_a_scrape_flushes_first_so_no_later_scrape_sees_less(tmp_path: Path) -> None:
    worker = Worker(tmp_path, "a")
    worker.requests.labels("200").inc(7)
    assert scrape(worker.tally)["gateway_requests_total"] == {(("status", "200"),): 7.0}
    other = Tally(tmp_path, "reader")  # a second worker reading the same directory
    other.file = tmp_path / "reader-1.tally"
    Counter(other, "gateway_requests", "Requests.", ("status",))
    assert scrape(other)["gateway_requests_total"] == {(("status", "200"),): 7.0}


def test_wrong_label_counts_and_duplicate_names_are_refused() -> None:
    worker = Worker(None, "solo")
    with pytest.raises(ValueError, match="labels"):
        worker.requests.labels("200", "extra")
    with pytest.raises(ValueError, match="defined twice"):
        Counter(worker.tally, "gateway_requests", "Again.")
