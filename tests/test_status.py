"""The status page's arithmetic (``proxy/observe/status.py``) on hand-made metric families:
percentiles as Prometheus' ``histogram_quantile`` computes them, totals that count only
the API's traffic, live rates between two samples; and the names it reads are those
the real ``Metrics`` writes."""

from __future__ import annotations

import math

import pytest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from proxy.app import build_app
from proxy.config.loader import config_from_dict
from proxy.observe import status
from proxy.observe.metrics import METRICS
from proxy.observe.status import History, Sample, histogram_quantile, live, sample, totals
from proxy.providers import PROVIDER_TYPES
from proxy.record import Origin, Record

INF = math.inf


@pytest.mark.parametrize(("q", "buckets", "expected"), [
    (0.5, {0.1: 0, 0.2: 10, 0.5: 10, INF: 10}, 0.15),  # within the bucket, linearly
    (0.5, {1.0: 10, INF: 10}, 0.5),  # the first bucket starts at 0
    (0.99, {0.1: 5, 1.0: 5, INF: 10}, 1.0),  # in +Inf: the last finite bound
    (0.95, {0.25: 0, 0.5: 100, INF: 100}, 0.4875),
    (0.5, {0.1: 0, INF: 0}, None),  # nothing observed
    (0.5, {0.1: 4, 1.0: 8}, None),  # no +Inf bucket: not a histogram
    (0.5, {}, None),
])
def test_histogram_quantile_interpolates_like_prometheus(
    q: float, buckets: dict[float, float], expected: float | None,
) -> None:
    result = histogram_quantile(q, buckets)
    assert result == (None if expected is None else pytest.approx(expected))


def families() -> list[Metric]:
    requests = CounterMetricFamily("gateway_requests", "", labels=[
        "route", "model", "provider", "status"])
    requests.add_metric(["/v1/chat/completions", "m", "up", "200"], 6)
    requests.add_metric(["/v1/chat/completions", "m", "up", "502"], 1)
    requests.add_metric(["/v1/chat/completions", "nope", "none", "404"], 2)
    requests.add_metric(["/v1/embeddings", "e", "other-up", "200"], 1)
    requests.add_metric(["/ui/stats", "none", "none", "200"], 50)  # the page's own polls
    duration = HistogramMetricFamily("http_server_request_duration_seconds", "", labels=[
        "http_request_method", "http_route", "http_response_status_code"])
    duration.add_metric(["POST", "/v1/chat/completions", "200"],
                        [("0.1", 2), ("0.5", 6), ("+Inf", 6)], 1.0)
    duration.add_metric(["POST", "/v1/embeddings", "200"],
                        [("0.1", 2), ("0.5", 4), ("+Inf", 4)], 1.0)
    duration.add_metric(["GET", "/ui/stats", "200"], [("0.1", 50), ("0.5", 50),
                                                      ("+Inf", 50)], 0.1)
    cache = CounterMetricFamily("gateway_cache_lookups", "", labels=["result"])
    cache.add_metric(["hit"], 2)
    cache.add_metric(["miss"], 6)
    dedup = CounterMetricFamily("gateway_dedup_requests", "", labels=["role"])
    dedup.add_metric(["leader"], 3)
    dedup.add_metric(["follower"], 1)
    in_flight = GaugeMetricFamily("gateway_requests_in_flight", "", labels=["pid"])
    in_flight.add_metric(["1"], 2)  # one per worker in multiprocess "all" mode: summed
    in_flight.add_metric(["2"], 1)
    return [requests, duration, cache, dedup, in_flight]


def test_totals_count_the_api_traffic_only() -> None:
    now = sample(families())
    figures = totals(now)
    assert figures["requests"] == 10 and figures["in_flight"] == 3
    assert (figures["errors_4xx"], figures["errors_5xx"]) == (2, 1)
    assert (figures["error_4xx"], figures["error_5xx"]) == (0.2, 0.1)
    assert (figures["cache_hits"], figures["cache_misses"], figures["cache_hit_rate"]) == (
        2, 6, 0.25)
    assert (figures["dedup_followers"], figures["dedup_hit_rate"]) == (1, 0.25)
    # /v1/ buckets summed: 4 under 100 ms, 10 under 500 ms; /ui/stats left out.
    assert now.latency == {0.1: 4, 0.5: 10, INF: 10}
    assert figures["latency_ms"] == {"p50": pytest.approx(166.667), "p95": pytest.approx(
        466.667), "p99": pytest.approx(493.333)}
    assert figures["overhead_ms"] == {"p50": None, "p95": None, "p99": None}
    rows = status.provider_rows([{"name": "up"}, {"name": "idle"}], now)
    assert [(r["name"], r["requests"], r["errors_5xx"]) for r in rows] == [
        ("up", 7, 1), ("idle", 0, 0)]


def test_no_traffic_gives_no_rates_and_no_percentiles() -> None:
    figures = totals(sample([]))
    assert figures["requests"] == 0
    assert figures["cache_hit_rate"] is None and figures["error_5xx"] is None
    assert figures["latency_ms"]["p99"] is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def at(requests: float, server_errors: float = 0, fast: float = 0) -> Sample:
    return Sample(requests=requests, server_errors=server_errors,
                  latency={0.1: fast, 1.0: requests, INF: requests})


def test_live_rates_are_deltas_over_about_the_window() -> None:
    clock = Clock()
    history = History(clock)
    assert history.add(at(0)) is None  # nothing to compare with yet
    clock.now += 0.1
    assert history.add(at(1)) is None  # too short an interval to say anything
    clock.now += 1.9
    figures = live(history.add(at(20, server_errors=2, fast=20)))
    assert figures is not None
    assert (figures["window_s"], figures["rps"], figures["error_5xx"]) == (2.0, 10.0, 0.1)
    assert figures["latency_ms"]["p50"] == 50.0
    for n in range(2, 12):  # polled every 2 s for 20 s more: the base stays ~10 s back
        clock.now += 2
        change = history.add(at(20 + 10 * n))
    assert change is not None
    seconds, delta = change
    assert 10 <= seconds <= 12 and delta.requests == pytest.approx(seconds * 5)
    assert "samples=" in repr(history)


def test_a_counter_going_backwards_resets_the_live_rates() -> None:
    clock = Clock()
    history = History(clock)
    history.add(at(100))
    clock.now += 2
    assert history.add(at(3)) is None  # the metrics restarted: no negative rate
    clock.now += 2
    figures = live(history.add(at(7)))
    assert figures is not None and figures["rps"] == 2.0


async def test_the_names_read_are_those_the_metrics_write() -> None:
    """A drift between ``metrics.py`` and this page would show zeros, not fail."""
    config = config_from_dict({"providers": [
        {"name": "up", "type": "openai_compat", "base_url": "http://127.0.0.1:9/v1",
         "models": ["m"]}]}, {}, PROVIDER_TYPES.keys())
    metrics = build_app(config)[METRICS]
    for code, cache in ((200, "miss"), (200, "hit"), (502, None)):
        record = Record(0.0, "POST", path="/v1/chat/completions", model="m",
                        origin=Origin("up", "m"), status=code, cache=cache,
                        dedup="leader", finished=0.05)
        metrics.observe([record])
    figures = totals(sample(metrics.collect()))
    assert (figures["requests"], figures["errors_5xx"]) == (3, 1)
    assert (figures["cache_hits"], figures["cache_misses"], figures["dedup_leaders"]) == (
        1, 1, 3)
    assert figures["latency_ms"]["p50"] is not None
    assert figures["overhead_ms"]["p50"] is not None
