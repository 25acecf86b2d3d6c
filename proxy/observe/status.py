"""The status page's figures (``GET /ui/stats``), computed from the metric families.

The page (``proxy/ui/status.html``) only renders: every number is computed here, from
what ``Metrics.collect()`` yields, so the figures are those a Prometheus scrape gets
(summed across workers once the metrics are) and this module is tested on hand-made
families. Percentiles are read from histogram buckets and interpolated linearly within a
bucket, as Prometheus' ``histogram_quantile`` does.

Live figures (requests per second, recent latency and errors) are deltas between two
samples of the cumulative counters. They are taken on the server, by :class:`History`:
a few recent samples kept per worker, the rate measured against the one about
``WINDOW`` seconds old. So the page stays a dumb renderer, two open tabs do not shorten
each other's interval, and the arithmetic is the tested Python, not page script.

Only the API's own traffic (routes under ``/v1/``) counts as requests: the page's own
polls, ``/metrics`` scrapes and health checks would otherwise show up as load.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client.metrics_core import Metric

WINDOW = 10.0  # seconds the live rates aim to cover
MIN_INTERVAL = 0.5  # a shorter interval than this gives no rate (too noisy)
MAX_SAMPLES = 64  # bound on the samples kept, however often the page polls
QUANTILES = (0.5, 0.95, 0.99)

REQUESTS = "gateway_requests_total"
DURATION = "http_server_request_duration_seconds_bucket"
OVERHEAD = "gateway_overhead_seconds_bucket"
CACHE = "gateway_cache_lookups_total"
DEDUP = "gateway_dedup_requests_total"
IN_FLIGHT = "gateway_requests_in_flight"

Buckets = dict[float, float]  # upper bound -> cumulative count


def histogram_quantile(q: float, buckets: Buckets) -> float | None:
    """The ``q`` quantile of cumulative ``buckets``, interpolated within its bucket like
    Prometheus' ``histogram_quantile``; None without observations or a ``+Inf`` bucket.
    Past the last finite bound the answer is that bound (nothing better is known)."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf:
        return None
    total = buckets[math.inf]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return lower if len(bounds) > 1 else None
            if bound <= 0 or count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return None


def quantiles(buckets: Buckets) -> dict[str, float | None]:
    """p50/p95/p99 in milliseconds (what the page shows), None when nothing was seen."""
    out: dict[str, float | None] = {}
    for q in QUANTILES:
        value = histogram_quantile(q, buckets)
        out[f"p{round(q * 100)}"] = None if value is None else round(value * 1000, 3)
    return out


@dataclass(slots=True)
class Sample:
    """The cumulative counters at one moment: what two moments' deltas are made of."""

    requests: float = 0.0
    client_errors: float = 0.0  # 4xx
    server_errors: float = 0.0  # 5xx
    cache: dict[str, float] = field(default_factory=dict)  # result -> lookups
    dedup: dict[str, float] = field(default_factory=dict)  # role -> requests
    latency: Buckets = field(default_factory=dict)  # /v1/ request durations
    overhead: Buckets = field(default_factory=dict)
    in_flight: float = 0.0
    providers: dict[str, list[float]] = field(default_factory=dict)  # [requests, 5xx]

    def minus(self, old: Sample) -> Sample | None:
        """The counts between ``old`` and this one; None when a counter went backwards
        (the metrics were reset: a restarted single worker), so no delta is meaningful."""
        delta = Sample(self.requests - old.requests,
                       self.client_errors - old.client_errors,
                       self.server_errors - old.server_errors,
                       latency={le: n - old.latency.get(le, 0.0)
                                for le, n in self.latency.items()})
        counts = (delta.requests, delta.client_errors, delta.server_errors,
                  *delta.latency.values())
        return None if any(n < 0 for n in counts) else delta


def sample(families: Iterable[Metric]) -> Sample:
    """Read the figures the page needs out of the metric families, summing label sets."""
    out = Sample()
    for family in families:
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name == REQUESTS:
                _count_request(out, labels, value)
            elif name == DURATION and labels.get("http_route", "").startswith("/v1/"):
                _add_bucket(out.latency, labels, value)
            elif name == OVERHEAD:
                _add_bucket(out.overhead, labels, value)
            elif name == CACHE:
                _add(out.cache, labels.get("result", ""), value)
            elif name == DEDUP:
                _add(out.dedup, labels.get("role", ""), value)
            elif name == IN_FLIGHT:
                out.in_flight += value
    return out


def _count_request(out: Sample, labels: dict[str, str], value: float) -> None:
    if not labels.get("route", "").startswith("/v1/"):
        return
    status = labels.get("status", "")
    out.requests += value
    server_error = status.startswith("5")
    out.client_errors += value if status.startswith("4") else 0.0
    out.server_errors += value if server_error else 0.0
    provider = labels.get("provider", "none")
    if provider != "none":
        counts = out.providers.setdefault(provider, [0.0, 0.0])
        counts[0] += value
        counts[1] += value if server_error else 0.0


def _add_bucket(buckets: Buckets, labels: dict[str, str], value: float) -> None:
    _add(buckets, float(labels.get("le", "+Inf")), value)


def _add(counts: dict[Any, float], key: Any, value: float) -> None:
    counts[key] = counts.get(key, 0.0) + value


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


class History:
    """The recent samples of one worker, for the live rates (see the module doc).

    Kept: the newest samples plus the newest one at least ``WINDOW`` seconds old, so
    the base of a rate is about ``WINDOW`` seconds back once the page has polled that
    long (less at first), and at most ``MAX_SAMPLES`` however often it polls."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._samples: deque[tuple[float, Sample]] = deque(maxlen=MAX_SAMPLES)

    def __repr__(self) -> str:
        return f"<History samples={len(self._samples)}>"

    def add(self, now_sample: Sample) -> tuple[float, Sample] | None:
        """Record ``now_sample``; return (seconds, delta) against the base, or None
        when there is no usable base yet."""
        now = self._clock()
        samples = self._samples
        while len(samples) > 1 and now - samples[1][0] >= WINDOW:
            samples.popleft()
        base = samples[0] if samples else None
        samples.append((now, now_sample))
        if base is None or now - base[0] < MIN_INTERVAL:
            return None
        delta = now_sample.minus(base[1])
        if delta is None:  # reset: start again from this sample
            samples.clear()
            samples.append((now, now_sample))
            return None
        return now - base[0], delta


def live(change: tuple[float, Sample] | None) -> dict[str, Any] | None:
    """Requests per second, error shares and percentiles between two samples."""
    if change is None:
        return None
    seconds, delta = change
    return {
        "window_s": round(seconds, 1),
        "rps": round(delta.requests / seconds, 2),
        "error_4xx": _ratio(delta.client_errors, delta.requests),
        "error_5xx": _ratio(delta.server_errors, delta.requests),
        "latency_ms": quantiles(delta.latency),
    }


def totals(now: Sample) -> dict[str, Any]:
    """Everything since the start, from the cumulative counters."""
    hits, misses = now.cache.get("hit", 0.0), now.cache.get("miss", 0.0)
    leaders, followers = now.dedup.get("leader", 0.0), now.dedup.get("follower", 0.0)
    return {
        "requests": int(now.requests), "in_flight": int(now.in_flight),
        "errors_4xx": int(now.client_errors), "errors_5xx": int(now.server_errors),
        "error_4xx": _ratio(now.client_errors, now.requests),
        "error_5xx": _ratio(now.server_errors, now.requests),
        "cache_hits": int(hits), "cache_misses": int(misses),
        "cache_hit_rate": _ratio(hits, hits + misses),
        "dedup_leaders": int(leaders), "dedup_followers": int(followers),
        "dedup_hit_rate": _ratio(followers, leaders + followers),
        "latency_ms": quantiles(now.latency),
        "overhead_ms": quantiles(now.overhead),
    }


def provider_rows(health: list[dict[str, Any]], now: Sample) -> list[dict[str, Any]]:
    """``/health``'s provider view with each provider's request and 5xx counts."""
    rows = []
    for provider in health:
        requests, errors = now.providers.get(provider["name"], (0.0, 0.0))
        rows.append({**provider, "requests": int(requests), "errors_5xx": int(errors)})
    return rows


HISTORY = web.AppKey("status_history", History)  # one per worker app (``app.py``)
NO_STORE = {"Cache-Control": "no-store"}


@dataclass(frozen=True, slots=True)
class Page:
    body: bytes
    headers: dict[str, str]


def load_page() -> Page:
    """The page, read once from the package (``proxy/ui/status.html``), with headers
    allowing only its own inline script and style (by hash) and requests to its own
    origin: the admin key it keeps in ``sessionStorage`` is worth an XSS, and a figure
    (an upstream's error message) is never trusted as markup."""
    body = resources.files("proxy").joinpath("ui/status.html").read_bytes()
    text = body.decode()
    hashes = {tag: " ".join(f"'sha256-{_digest(m)}'" for m in re.findall(
        rf"<{tag}>(.*?)</{tag}>", text, re.S)) for tag in ("script", "style")}
    policy = (f"default-src 'none'; script-src {hashes['script']}; "
              f"style-src {hashes['style']}; connect-src 'self'; img-src data:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return Page(body, {"Content-Type": "text/html; charset=utf-8",
                       "Content-Security-Policy": policy, "Referrer-Policy": "no-referrer",
                       "X-Content-Type-Options": "nosniff", **NO_STORE})


def _digest(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


PAGE = load_page()  # at import: a package installed without its page fails at start
