"""Resident memory and file descriptors of one gateway worker under load (issues #3, #11).

Why: a gateway worker lives for weeks; what it holds must not grow with the requests it
has served, and streams cut short by their clients must give back their memory, sockets
and upstream connections. Targets: RSS <= 60 MB per idle worker, growth < 10 MB per
100,000 requests (issue 3); with ``--long``, idle RSS <= 50 MB and flat over 1M requests
(issue 11).

``--long`` (e.g. ``--long --requests 1000000``): after the idle snapshot, one long run
of ``--requests`` non-stream requests in all, with a snapshot every ``--sample-every``
(100,000) requests, stopped when ``--max-seconds`` (900) have passed (the batch then
running is cut and not counted; the report says so). No stream or disconnect steps. The
report gives the idle RSS, every sample, and whether the RSS after the first sample
stays within ``FLAT_MB`` (2 MB) of it ("flat"): the first 100,000 requests may warm
caches and pools once; what comes after must not grow.

How: a mock upstream (``python -m proxy.mock``, instant answers) and one gateway worker
(``python -m proxy serve --upstream ...``, default config) are started on free loopback
ports; then, in order, with a snapshot of the worker after each step:

1. ``idle``: 1 s after the worker first answered ``/healthz``;
2. ``100k #1`` and ``100k #2``: ``--requests`` non-stream chat POSTs each, sent by
   ``bench.load``'s ``run_load`` (64 keep-alive connections, closed loop, no warm-up;
   the same as ``python -m bench.load --url URL --requests N --connections 64 --warmup 0``);
3. ``streams``: ``--streams`` streamed answers (8 SSE chunks each), same generator;
4. ``disconnects``: ``--disconnects`` streams of 100 chunks 50 ms apart (5 s each, asked
   for with ``X-Mock-*`` headers) that the client abandons after the first chunk (an
   aiohttp loop, 32 at a time, one connection each).

Each snapshot is taken once the worker has closed its side of the clients' connections
(polled, at most 5 s), so only what the worker keeps is counted.

How to read the table: ``RSS`` is ``VmRSS`` from ``/proc/PID/status``; ``fds`` counts
``/proc/PID/fd``; ``upstream conns`` are the worker's TCP connections to the mock (its
keep-alive pool, kept 30 s by default), found by matching the worker's socket inodes with
``/proc/net/tcp``; ``other fds`` = ``fds`` - ``upstream conns``, which should equal the
idle figure after every step (nothing leaked). ``growth`` is the RSS change over the
step. Each row also shows that step's requests, errors and rate (and latency, from
``bench.load``). After ``disconnects``, ``upstream conns`` tells whether the worker
cancelled the upstream reads: each abandoned stream would run 5 s more upstream, so a
worker that kept reading would still hold up to 32 upstream connections at that moment
(a connection cut mid-answer cannot go back to the pool, so none of them are pooled).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import uvloop

from bench.load import LoadOptions, run_load
from bench.procs import Process, free_port, wait_ready
from bench.targets import CHAT

IDLE_TARGET_MB, GROWTH_TARGET_MB = 60.0, 10.0
LONG_IDLE_MB, FLAT_MB = 50.0, 2.0  # issue 11: "idle RSS <= 50 MB per worker, flat over 1M"
_ESTABLISHED = "01"
_T = TypeVar("_T")


def run_until_signal(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` on uvloop; SIGINT or SIGTERM cancels it, so every ``finally`` in it
    runs and stops what it started, then ``KeyboardInterrupt`` is raised. (A handler that
    raises from inside the loop is not enough: uvloop reports an exception raised in a
    protocol callback and carries on.) Installed even if a shell set SIGINT ignored.
    Shared by ``bench.dedup`` and ``bench.overload``."""
    async def guarded() -> _T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
        return await main

    try:
        return uvloop.run(guarded())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None


def rss_mb(pid: int) -> float:
    """``VmRSS`` of one process, in MB (MiB, as ``/proc`` counts kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_inodes(pid: int) -> set[str]:
    """Inodes of the sockets process ``pid`` holds (``socket:[N]`` links in its fd dir)."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed between listdir and readlink
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                found.add(target[8:-1])
    return found


def tcp_inodes(port: int, *, local: bool) -> set[str]:
    """Inodes of established IPv4 TCP connections whose local (or remote) port is ``port``."""
    found = set()
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    for fields in (line.split() for line in lines):
        address = fields[1] if local else fields[2]
        if fields[3] == _ESTABLISHED and int(address.rsplit(":", 1)[1], 16) == port:
            found.add(fields[9])
    return found


async def snapshot(pid: int, ports: tuple[int, int]) -> dict[str, Any]:
    """The worker's figures once the clients' connections to it are closed (the load
    generator aborts its own; the worker notices within a loop iteration or two), polled
    every 50 ms for at most 5 s. ``ports``: the gateway's and the upstream's."""
    gateway, upstream = ports
    for _ in range(100):
        if not socket_inodes(pid) & tcp_inodes(gateway, local=True):
            break
        await asyncio.sleep(0.05)
    conns = len(socket_inodes(pid) & tcp_inodes(upstream, local=False))
    fds = fd_count(pid)
    return {"rss_mb": rss_mb(pid), "fds": fds, "upstream_conns": conns,
            "other_fds": fds - conns}


async def load_step(url: str, requests: int, *, stream: bool) -> dict[str, Any]:
    """One bounded ``run_load`` run; what the table shows of it."""
    result = await run_load(LoadOptions(url=url, connections=64, requests=requests,
                                        stream=stream, duration=600.0, timeout=30.0))
    return {"requests": result.requests, "errors": result.errors, "rps": result.rps,
            "p50_ms": result.latency_ms.p50, "p99_ms": result.latency_ms.p99}


async def _abandon(session: aiohttp.ClientSession, url: str, body: bytes) -> str:
    """One stream, dropped after its first chunk: ``ok`` if a chunk came, else why not."""
    headers = {"Content-Type": "application/json", "X-Mock-Chunks": "100",
               "X-Mock-Interval": "0.05"}
    try:
        async with session.post(url, data=body, headers=headers) as answer:
            if answer.status != 200:
                return f"status_{answer.status}"
            first = await answer.content.readany()
            answer.close()  # drops the connection mid-stream: the client "goes away"
            return "ok" if first else "empty"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


async def disconnects(url: str, count: int, concurrency: int = 32) -> dict[str, Any]:
    """``count`` abandoned streams, ``concurrency`` at a time, each on its own connection
    (the pool keeps none: an abandoned connection cannot be reused)."""
    body = orjson.dumps({"model": "mock-gpt", "stream": True,
                         "messages": [{"role": "user", "content": "Tell a long story."}]})
    outcomes: dict[str, int] = {}
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()

    async def one() -> None:
        async with gate:
            kind = await _abandon(session, url, body)
            outcomes[kind] = outcomes.get(kind, 0) + 1

    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, \
            asyncio.timeout(max(60.0, count * 0.05)):
        await asyncio.gather(*(one() for _ in range(count)))
    elapsed = time.perf_counter() - started
    ok = outcomes.pop("ok", 0)
    return {"requests": count, "errors": outcomes, "rps": round(ok / elapsed, 1)}


def start(workdir: Path, stack: contextlib.ExitStack
          ) -> tuple[Process, tuple[int, int], str]:
    """The mock upstream and one gateway worker, both stopped by ``stack``."""
    py, up, gw = sys.executable, free_port(), free_port()
    upstream = Process("upstream", [py, "-m", "proxy.mock", "--port", str(up)],
                       workdir, None)
    stack.callback(upstream.stop)
    wait_ready(upstream, f"http://127.0.0.1:{up}/v1/models")
    gateway = Process("gateway", [py, "-m", "proxy", "serve", "--upstream",
                                  f"http://127.0.0.1:{up}/v1", "--port", str(gw)], workdir, None)
    stack.callback(gateway.stop)
    wait_ready(gateway, f"http://127.0.0.1:{gw}/healthz")
    return gateway, (gw, up), f"http://127.0.0.1:{gw}{CHAT}"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every step in order on one fresh worker; see the module docstring."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, \
            contextlib.ExitStack() as stack:
        gateway, ports, url = start(Path(tmp), stack)  # blocks: nothing else runs yet
        pid = gateway.popen.pid
        await asyncio.sleep(1.0)
        rows.append({"step": "idle", **await snapshot(pid, ports)})
        for batch, count, stream in ((1, args.requests, False), (2, args.requests, False),
                                     (0, args.streams, True)):
            step = f"{count:,} streams" if stream else f"{count:,} requests #{batch}"
            print(f"memory: {step}", file=sys.stderr)
            rows.append({"step": step, **await load_step(url, count, stream=stream),
                         **await snapshot(pid, ports)})
        step = f"{args.disconnects:,} disconnects"
        print(f"memory: {step}", file=sys.stderr)
        cut = await disconnects(url, args.disconnects)
        rows.append({"step": step, **cut, **await snapshot(pid, ports)})
    return summarize(rows)


async def long_run(args: argparse.Namespace) -> dict[str, Any]:
    """``--long``: the idle snapshot, then batches of ``--sample-every`` requests, each
    followed by a snapshot, until ``--requests`` are sent or ``--max-seconds`` pass."""
    samples: list[dict[str, Any]] = []
    stopped = None
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, \
            contextlib.ExitStack() as stack:
        gateway, ports, url = start(Path(tmp), stack)
        pid, deadline = gateway.popen.pid, time.monotonic() + args.max_seconds
        await asyncio.sleep(1.0)
        idle = await snapshot(pid, ports)
        sent = 0
        while sent < args.requests:
            count = min(args.sample_every, args.requests - sent)
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    step = await load_step(url, count, stream=False)
            except TimeoutError:
                stopped = f"--max-seconds {args.max_seconds:g} reached after {sent:,} requests"
                break
            sent += step.pop("requests")  # answers and failures; the row shows the total
            samples.append({"requests": sent, **step, **await snapshot(pid, ports)})
            print(f"memory: {sent:,} requests, RSS {samples[-1]['rss_mb']} MB",
                  file=sys.stderr)
    return summarize_long(idle, samples, stopped)


def summarize_long(idle: dict[str, Any], samples: list[dict[str, Any]],
                   stopped: str | None) -> dict[str, Any]:
    """Each sample's RSS against the first one's; flat if none is ``FLAT_MB`` above it."""
    first = samples[0]["rss_mb"] if samples else idle["rss_mb"]
    for sample in samples:
        sample["since_first_mb"] = round(sample["rss_mb"] - first, 1)
    growth = max((s["since_first_mb"] for s in samples), default=0.0)
    errors = sum(sum(s["errors"].values()) for s in samples)
    targets = {f"idle RSS <= {LONG_IDLE_MB:g} MB": idle["rss_mb"] <= LONG_IDLE_MB,
               f"flat: <= {FLAT_MB:g} MB above the first sample": growth <= FLAT_MB,
               "every request answered": errors == 0, "all requests sent": stopped is None}
    return {"idle": idle, "samples": samples, "growth_after_first_mb": growth,
            "flat": growth <= FLAT_MB, "stopped": stopped, "targets": targets}


def markdown_long(report: dict[str, Any]) -> str:
    cols = ["requests", "rss_mb", "since_first_mb", "fds", "upstream_conns", "other_fds",
            "errors", "rps", "p50_ms", "p99_ms"]
    idle = report["idle"]
    lines = [f"Idle: RSS {idle['rss_mb']} MB, {idle['fds']} fds.", "",
             "| sample | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(_cell(row.get(c)) for c in cols) + " |"
              for n, row in enumerate(report["samples"], 1)]
    lines += ["", f"Growth after the first sample: +{report['growth_after_first_mb']:g} MB "
              f"(max); flat (<= {FLAT_MB:g} MB): {'yes' if report['flat'] else 'NO'}."]
    lines += [f"Stopped early: {report['stopped']}"] if report["stopped"] else []
    lines += ["Targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}"
                                      for name, ok in report["targets"].items())]
    return "\n".join(lines)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step growth, and the targets judged on the idle row and the two 100k rows."""
    for previous, row in itertools.pairwise(rows):
        row["growth_mb"] = round(row["rss_mb"] - previous["rss_mb"], 1)
    idle, first, second = rows[0], rows[1], rows[2]
    targets = {
        f"idle RSS <= {IDLE_TARGET_MB:g} MB": idle["rss_mb"] <= IDLE_TARGET_MB,
        f"growth over 1st batch < {GROWTH_TARGET_MB:g} MB": first["growth_mb"] < GROWTH_TARGET_MB,
        f"growth over 2nd batch < {GROWTH_TARGET_MB:g} MB":
            second["growth_mb"] < GROWTH_TARGET_MB,
        "other fds back to idle after disconnects": rows[-1]["other_fds"] <= idle["other_fds"],
    }
    return {"steps": rows, "targets": targets}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{kind} {count}" for kind, count in value.items()) or "0"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(report: dict[str, Any]) -> str:
    cols = ["rss_mb", "growth_mb", "fds", "upstream_conns", "other_fds", "requests", "errors",
            "rps", "p50_ms", "p99_ms"]
    lines = ["| step | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {row['step']} | " + " | ".join(_cell(row.get(c)) for c in cols) + " |"
              for row in report["steps"]]
    lines += ["", "Targets: " + "; ".join(f"{name}: {'met' if ok else 'MISSED'}"
                                          for name, ok in report["targets"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000,
                        help="non-stream requests per batch (two batches)")
    parser.add_argument("--streams", type=int, default=5_000)
    parser.add_argument("--disconnects", type=int, default=2_000)
    parser.add_argument("--json", action="store_true", help="print JSON, not Markdown")
    parser.add_argument("--long", action="store_true",
                        help="one run of --requests in all, sampled (see above)")
    parser.add_argument("--sample-every", type=int, default=100_000, metavar="N",
                        help="--long: a snapshot after every N requests")
    parser.add_argument("--max-seconds", type=float, default=900.0,
                        help="--long: stop the run after this long")
    args = parser.parse_args(argv)
    for name in ("requests", "streams", "disconnects", "sample_every"):
        if not 1 <= getattr(args, name) <= 10_000_000:
            parser.error(f"--{name.replace('_', '-')} must be in 1..10000000")
    if not 0 < args.max_seconds <= 86_400:
        parser.error("--max-seconds must be in (0, 86400]")
    try:
        report = run_until_signal(long_run(args) if args.long else run(args))
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as exc:  # a process that did not start
        print(f"memory: {exc}", file=sys.stderr)
        sys.exit(1)
    show = markdown_long if args.long else markdown
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if args.json
          else show(report))


if __name__ == "__main__":
    main()
