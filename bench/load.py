"""An HTTP/1.1 load generator for the gateway's benchmarks (issue #3, "bench/").

Why not aiohttp's ``ClientSession``: it costs ~60 us of CPU per request (measured here:
17k req/s on a whole core against nginx), and on this 2-core machine the generator shares
a core with the mock upstream, so it would be the bottleneck. Each connection here is a
bare ``asyncio.Protocol`` on uvloop: the request is rendered once and sent with one
``write``; the answer is parsed in place (``Content-Length`` or chunked framing, no
trailers) and the next request leaves from ``data_received``, with no task, future or
object per request. Measured the same way (one process pinned to one core, 64
connections, nginx answering a constant body on the other core): 100-107k req/s at
97% of its core (54k on a busier machine). Against the mock upstream (17k req/s direct)
it takes ~26% of the core it shares with the mock, which takes the rest: the mock is the
limit there. ``LoadResult.client_cpu`` reports the generator's CPU share on every run.

Closed loop (default): each connection sends its next request when the answer is in.
Open loop (``--rate R``): requests are due at ``start + i/R`` whatever the answers do; a
request that must wait for a free connection counts its latency from its *scheduled*
time, so a stalling target cannot hide its stall by slowing the generator (coordinated
omission, as in wrk2).

Always bounded: ``--duration`` (default 10 s) or ``--requests``, at most 10 min; every
request and the final drain under ``--timeout``. ``requests`` counts answers and
failures; ``rps`` only 2xx answers, so failing fast cannot win. The default body has no
``temperature``/``seed``, so the gateway's dedup and cache (deterministic requests only)
stay out of the way and relaying is what is measured. Streams: TTFB is the time to the
first *body* byte (a proxy that sends headers early but buffers must not look fast); the
gap is the mean time between SSE events (``\\n\\n``) within one answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import sys
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.load_conn import Conn

MAX_DURATION = 600.0
_CONNECT_TIMEOUT = 5.0
_RECONNECT_DELAY = 0.1
_now = time.perf_counter


class LoadError(Exception):
    """The run could not start (bad options, target not listening)."""


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """One run. ``requests`` (a count after warm-up) replaces ``duration`` when given."""

    url: str
    connections: int = 64
    duration: float = 10.0
    requests: int | None = None
    stream: bool = False
    rate: float | None = None
    model: str = "mock-gpt"
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    warmup: float = 0.0
    timeout: float = 30.0

    def __post_init__(self) -> None:
        checks = ((1 <= self.connections <= 10_000, "connections must be 1..10000"),
                  (0 < self.duration <= MAX_DURATION, "duration must be in (0, 600] s"),
                  (0 <= self.warmup <= 60, "warmup must be in [0, 60] s"),
                  (self.requests is None or self.requests >= 1, "requests must be >= 1"),
                  (self.rate is None or self.rate > 0, "rate must be > 0 req/s"),
                  (0 < self.timeout <= 600, "timeout must be in (0, 600] s"),
                  (urlsplit(self.url).scheme == "http", "url must be http://host:port/path"))
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Milliseconds. ``mean`` too: the mock upstream's timers tick in whole milliseconds,
    which quantizes percentiles; the mean still shows sub-millisecond differences."""

    p50: float
    p90: float
    p99: float
    max: float
    mean: float


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a run measured; milliseconds for latencies, ``None`` when not applicable."""

    url: str
    connections: int
    rate: float | None
    stream: bool
    requests: int
    errors: dict[str, int]
    duration_s: float
    rps: float
    latency_ms: Percentiles
    ttfb_ms: Percentiles | None = None
    gap_ms: float | None = None
    client_cpu: float = 0.0
    """CPU seconds of the generator per wall second; near 1.0 means it was saturated."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadResult:
        """Read what ``--json`` printed (``compare.py`` runs the generator as a subprocess)."""
        ttfb = data.get("ttfb_ms")
        fields = {**data, "latency_ms": Percentiles(**data["latency_ms"]),
                  "ttfb_ms": None if ttfb is None else Percentiles(**ttfb)}
        return cls(**fields)


def _percentiles(samples: array[float]) -> Percentiles:
    """Nearest-rank percentiles in milliseconds (exact, from every sample kept)."""
    if not samples:
        return Percentiles(0.0, 0.0, 0.0, 0.0, 0.0)
    ordered = sorted(samples)
    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000, 3)
    mean = round(math.fsum(ordered) / len(ordered) * 1000, 3)
    return Percentiles(rank(0.50), rank(0.90), rank(0.99), rank(1.0), mean)


class _Driver:
    """Hands requests to connections, keeps the pool full and records the measured window.

    Samples are float32 seconds (4 bytes each: 10 min at 30k req/s stays near 70 MB);
    requests scheduled during warm-up are sent but not recorded.
    """

    def __init__(self, options: LoadOptions, measure_start: float) -> None:
        self.options, self.measure_start = options, measure_start
        self.request, self.count_events = render_request(options), options.stream
        self.idle: list[Conn] = []
        self.conns: set[Conn] = set()
        self.pending: deque[float] = deque()  # open loop: due times with no free connection
        self.sending = True
        self.budget = options.requests  # requests still to send in the measured window
        self.reconnects: set[asyncio.Task[None]] = set()
        self.quiet = asyncio.Event()  # nothing in flight and nothing more to send
        self.spent = asyncio.Event()  # the request budget is used up
        self.latency, self.ttfb, self.gaps = array("f"), array("f"), array("f")
        self.errors: Counter[str] = Counter()
        self.last_done, self.cpu_start = measure_start, time.process_time()

    def dispatch(self, conn: Conn, now: float) -> None:
        """Give a free connection its next request (due now in closed loop), or park it."""
        due = self.pending.popleft() if self.pending else None
        if due is None and self.options.rate is None and self.sending:
            due = now
            if now >= self.measure_start and self.budget is not None:
                self.budget -= 1
                if self.budget < 0:
                    self.spent.set()
                    due = None
        if due is None:
            self.idle.append(conn)
            self._check_quiet()
        else:
            conn.send(due)

    def schedule(self, due: float) -> None:
        """Open loop: one request due at ``due``. With a free connection it leaves now and
        its latency counts from now: being up to ~1 ms late is uvloop's timer granularity,
        the generator's own. With none free it waits and counts from ``due``: that wait
        is the target's doing (coordinated omission)."""
        if self.idle:
            self.idle.pop().send(max(due, _now()))
        else:
            self.pending.append(due)

    def finished(self, conn: Conn, now: float) -> None:
        if conn.scheduled >= self.measure_start:
            if 200 <= conn.status < 300:
                self.latency.append(now - conn.scheduled)
                self.ttfb.append((conn.first_byte or now) - conn.scheduled)
                if conn.events > 1:
                    self.gaps.append((conn.last_event - conn.first_event) / (conn.events - 1))
                self.last_done = now
            else:
                self.error(f"status_{conn.status}")
        if conn.close and conn.transport is not None:  # lost() will replace it
            conn.transport.close()
        else:
            self.dispatch(conn, now)

    def error(self, kind: str) -> None:
        self.errors[kind] += 1
        self.last_done = _now()

    def fail(self, conn: Conn, kind: str) -> None:
        """Count the request in flight on ``conn`` as failed and drop the connection."""
        if conn.busy and conn.scheduled >= self.measure_start:
            self.error(kind)
        conn.busy = False
        if conn.transport is not None:
            conn.transport.abort()

    def lost(self, conn: Conn) -> None:
        self.fail(conn, "disconnect")
        self.conns.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if self.sending or self.pending:
            task = asyncio.get_running_loop().create_task(self._reconnect())
            self.reconnects.add(task)
            task.add_done_callback(self.reconnects.discard)
        self._check_quiet()

    async def connect(self) -> Conn:
        url = urlsplit(self.options.url)
        opening = asyncio.get_running_loop().create_connection(
            lambda: Conn(self), url.hostname or "127.0.0.1", url.port or 80)
        _, conn = await asyncio.wait_for(opening, _CONNECT_TIMEOUT)
        self.conns.add(conn)
        return conn

    async def _reconnect(self) -> None:
        """Replace a lost connection; each failed attempt is an error, then a short wait."""
        while self.sending or self.pending:
            try:
                conn = await self.connect()
            except (OSError, TimeoutError):
                self.error("connect")
                await asyncio.sleep(_RECONNECT_DELAY)
                continue
            self.dispatch(conn, _now())
            return

    async def sweep(self) -> None:
        """Four times a second, fail requests written more than ``timeout`` ago."""
        while True:
            await asyncio.sleep(0.25)
            now = _now()
            for conn in [c for c in self.conns if c.busy]:
                if now - conn.written > self.options.timeout:
                    self.fail(conn, "timeout")

    def start_measuring(self) -> None:
        self.cpu_start = time.process_time()

    def stop(self) -> None:
        self.sending = False
        self._check_quiet()

    def _check_quiet(self) -> None:
        if not self.sending and not self.pending and not any(c.busy for c in self.conns):
            self.quiet.set()

    async def close(self) -> None:
        """Stop everything: reconnect attempts first, then every connection."""
        self.sending = False
        self.pending.clear()
        for task in list(self.reconnects):
            task.cancel()
        await asyncio.gather(*self.reconnects, return_exceptions=True)
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()

    def result(self, cpu_end: float) -> LoadResult:
        """``rps`` over the sending window (``duration``), or until the last answer of a
        ``requests`` run; answers still arriving after the window count in it."""
        options = self.options
        elapsed = options.duration if options.requests is None else max(
            self.last_done - self.measure_start, 1e-9)
        gap = sum(self.gaps) / len(self.gaps) * 1000 if self.gaps else None
        return LoadResult(
            url=options.url, connections=options.connections, rate=options.rate,
            stream=options.stream, requests=len(self.latency) + sum(self.errors.values()),
            errors=dict(sorted(self.errors.items())), duration_s=round(elapsed, 3),
            rps=round(len(self.latency) / elapsed, 1), latency_ms=_percentiles(self.latency),
            ttfb_ms=_percentiles(self.ttfb) if options.stream else None,
            gap_ms=None if gap is None else round(gap, 3),
            client_cpu=round((cpu_end - self.cpu_start) / elapsed, 3))


def render_request(options: LoadOptions) -> bytes:
    """The one request every connection sends: head and body in a single buffer."""
    target = urlsplit(options.url)
    if options.body is not None:
        body = options.body
        if options.stream:
            payload = orjson.loads(body)
            if not isinstance(payload, dict):
                raise LoadError("--body-file must hold a JSON object")
            body = orjson.dumps({**payload, "stream": True})
    else:
        message = {"role": "user", "content": "Say hello to the benchmark."}
        body = orjson.dumps({"model": options.model, "messages": [message],
                             "stream": options.stream})
    path = (target.path or "/") + (f"?{target.query}" if target.query else "")
    lines = [f"POST {path} HTTP/1.1", f"Host: {target.netloc}",
             "Content-Type: application/json", f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in options.headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def _open_loop(driver: _Driver, rate: float, start: float, end: float) -> None:
    """Schedule requests at ``start + i/rate`` until ``end`` or the request budget."""
    budget, index, counted = driver.options.requests, 0, 0
    while True:
        due = start + index / rate
        if due >= end or (budget is not None and counted >= budget):
            return
        now = _now()
        if due > now:
            await asyncio.sleep(due - now)
            continue
        driver.schedule(due)
        index += 1
        counted += due >= driver.measure_start


async def run_load(options: LoadOptions) -> LoadResult:
    """Run one bounded measurement against ``options.url`` and return what it measured."""
    start = _now()
    driver = _Driver(options, start + options.warmup)
    end = driver.measure_start + (MAX_DURATION if options.requests else options.duration)
    try:
        conns = await asyncio.gather(*(driver.connect() for _ in range(options.connections)))
    except (OSError, TimeoutError) as exc:
        await driver.close()
        raise LoadError(f"cannot connect to {options.url}: {exc!r}") from None
    loop = asyncio.get_running_loop()
    sweeper = loop.create_task(driver.sweep())
    loop.call_later(max(0.0, driver.measure_start - _now()), driver.start_measuring)
    try:
        for conn in conns:
            driver.dispatch(conn, _now())
        if options.rate is not None:
            await _open_loop(driver, options.rate, start, end)
        else:
            with contextlib.suppress(TimeoutError):  # ends at ``end`` or when budget is spent
                await asyncio.wait_for(driver.spent.wait(), end - _now())
        driver.stop()
        with contextlib.suppress(TimeoutError):  # drain what is in flight, bounded
            await asyncio.wait_for(driver.quiet.wait(), options.timeout)
        late = [*driver.pending, *(c.scheduled for c in driver.conns if c.busy)]
        for _ in (t for t in late if t >= driver.measure_start):
            driver.error("timeout")
        cpu_end = time.process_time()
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        await driver.close()
    return driver.result(cpu_end)


# --- command line -----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split(
        "\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", required=True, help="POST target, e.g. http://127.0.0.1:8080"
                        "/v1/chat/completions")
    parser.add_argument("--connections", type=int, default=64)
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    bound.add_argument("--requests", type=int, help="requests measured (instead of duration)")
    parser.add_argument("--stream", action="store_true", help="send stream=true")
    parser.add_argument("--rate", type=float, help="open loop: fixed offered req/s")
    parser.add_argument("--model", default="mock-gpt")
    parser.add_argument("--body-file", type=Path, help="JSON body to send instead")
    parser.add_argument("--header", action="append", default=[], metavar="K:V")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds not measured")
    parser.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _options(argv: list[str] | None) -> tuple[LoadOptions, bool]:
    parser = _parser()
    args = parser.parse_args(argv)
    headers = [h.partition(":") for h in args.header]
    if any(not name.strip() or not sep for name, sep, _ in headers):
        parser.error("--header takes NAME:VALUE")
    try:
        return LoadOptions(
            url=args.url, connections=args.connections, duration=args.duration,
            requests=args.requests, stream=args.stream, rate=args.rate, model=args.model,
            body=args.body_file.read_bytes() if args.body_file else None,
            headers=tuple((n.strip(), v.strip()) for n, _, v in headers),
            warmup=args.warmup, timeout=args.timeout), args.json
    except (ValueError, OSError) as exc:
        parser.error(str(exc))


def _summary(r: LoadResult) -> str:
    lat, ttfb = r.latency_ms, r.ttfb_ms
    return "\n".join([
        f"{r.url}: {r.requests} requests in {r.duration_s:.2f} s, {r.rps:.0f} req/s ok, "
        f"errors {r.errors or 'none'}, generator CPU {r.client_cpu:.0%} of a core",
        f"latency ms: p50 {lat.p50} p90 {lat.p90} p99 {lat.p99} max {lat.max}",
        *([] if ttfb is None else [f"ttfb ms: p50 {ttfb.p50} p99 {ttfb.p99}; "
                                   f"mean inter-event gap ms: {r.gap_ms}"])])


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.load --url URL [--rate R] [--stream] [--json]``; runs on uvloop."""
    import uvloop  # noqa: PLC0415 - only the command line needs it; run_load is loop-agnostic

    options, as_json = _options(argv)
    try:
        result = uvloop.run(run_load(options))
    except (LoadError, ValueError) as exc:
        print(f"load: {exc}", file=sys.stderr)
        sys.exit(1)
    print(orjson.dumps(result.to_json()).decode() if as_json else _summary(result))


if __name__ == "__main__":
    main()
