"""Load shedding: an upstream that slows down and pushes back under load, offered more
than it can take.

Why (issue #3, "Adaptive connection limits"): a proxy without limits passes every
request on; an upstream that slows down as its concurrency grows then serves fewer
requests per second the more it is sent, queues build everywhere and latency grows
until clients time out. The gateway's adaptive limit keeps the upstream near its best
concurrency, queues a few requests for at most ``queue_timeout``, and answers the
excess at once with 503 + ``Retry-After``; the requests it admits keep a bounded p99.

How: the upstream (this script with ``--serve-upstream``, in its own process) answers a
chat completion after ``base + step * max(0, in_flight - knee)`` seconds, ``in_flight``
counted when the request arrives: 50 ms up to 8 concurrent requests, 10 ms more for each
one beyond (``--base``, ``--step``, ``--knee``). Its throughput peaks at 160 req/s (8 in
flight) and falls towards 100 req/s as concurrency grows. With ``--reject-above`` (16)
requests in progress it pushes back (issue 9: the limiter now moves only on such
evidence): a request arriving then is answered 429 (odd calls) or 503 (even ones) after
``--reject-delay`` (0.2 s: a busy front end), and does not count as in progress. Two
targets, each with a fresh upstream, one after the other:

* ``gateway``: ``python -m proxy serve --upstream ... --config`` with ``limits: {min: 2,
  max: 64, queue_size: 16, queue_timeout: 0.5}`` (the limit starts at ``max``);
* ``naive``: ``bench/naive_proxy.py`` (one shared ClientSession, no limits).

The client is an open loop written here with aiohttp: ``--rate`` (400) requests per
second for ``--duration`` (8 s) whatever the answers do, on at most ``--connections``
(256) connections, each request failing after ``--timeout`` (10 s). Latency counts from
the moment a request was *due*, so time spent waiting for a free connection counts too
(coordinated omission). ``bench.load`` is not used because it keeps latencies of 2xx
answers only, and the point here is how fast the 503s come. The request body has no
``temperature``: no dedup, no cache.

How to read the output: per target, ``200`` answers (count, goodput: per second from
the start until the last one arrived, p50/p99/max latency), ``503`` answers (count,
p50/p99 time to receive them, how many carried ``Retry-After``), and other outcomes
(``timeout`` = no answer within ``--timeout``).
``upstream`` shows the calls it received and the most it had in flight; for the
gateway, ``limit`` and ``shed`` come from its ``/health`` after the run. A second table
gives the median latency of the ``200`` answers by second of the run: flat for the
gateway, climbing for the naive proxy. Values chosen for a 2-core machine: 400 req/s is
2.5x the upstream's best, low enough that neither proxy nor client is CPU-bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web

from bench.memory import run_until_signal
from bench.procs import Process, free_port, wait_ready
from bench.targets import CHAT

BODY = orjson.dumps({"model": "mock-gpt", "messages": [
    {"role": "user", "content": "Say hello to the benchmark."}]})
LIMITS = {"min": 2, "max": 64, "queue_size": 16, "queue_timeout": 0.5}
BUSY = {"error": {"message": "overloaded", "type": "server_error", "code": None}}


# --- the upstream (its own process) ------------------------------------------------------


@dataclass
class SlowUpstream:
    """Latency ``base + step * max(0, in_flight - knee)``, fixed when a request arrives;
    a request arriving with ``reject_above`` in progress gets 429 or 503 instead."""

    base: float
    step: float
    knee: int
    reject_above: int
    reject_delay: float
    in_flight: int = 0
    max_in_flight: int = 0
    calls: int = 0
    rejected: int = 0

    async def chat(self, request: web.Request) -> web.Response:
        self.calls += 1
        await request.read()
        if self.in_flight >= self.reject_above:
            self.rejected += 1
            await asyncio.sleep(self.reject_delay)
            return web.json_response(BUSY, status=429 if self.calls % 2 else 503)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.base + self.step * max(0, self.in_flight - self.knee))
            return web.json_response({
                "id": "chatcmpl-slow", "object": "chat.completion", "created": 0,
                "model": "mock-gpt", "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant",
                                                              "content": "Hello."}}]})
        finally:  # also when the caller went away (handler_cancellation)
            self.in_flight -= 1

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": "mock-gpt", "object": "model", "created": 0, "owned_by": "bench"}]})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"calls": self.calls, "max_in_flight": self.max_in_flight,
                                  "in_flight": self.in_flight, "rejected": self.rejected})


def serve_upstream(args: argparse.Namespace) -> None:
    """``--serve-upstream PORT``: serve until SIGTERM/SIGINT (aiohttp's run_app)."""
    upstream = SlowUpstream(args.base, args.step, args.knee, args.reject_above,
                            args.reject_delay)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.chat)
    app.router.add_get("/v1/models", upstream.models)
    app.router.add_get("/stats", upstream.stats)
    web.run_app(app, host="127.0.0.1", port=args.serve_upstream, access_log=None,
                handler_cancellation=True, shutdown_timeout=1.0, loop=uvloop.new_event_loop(),
                print=lambda *_: print("slow upstream ready", flush=True))


# --- the client ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    outcome: str  # the status ("200", "503" shed by the gateway, ...) or the failure
    due: float  # seconds after the start of the run
    seconds: float  # from due to the whole answer read
    retry_after: bool


async def one(session: aiohttp.ClientSession, url: str, start: float, due: float,
              samples: list[Sample]) -> None:
    """One request, due at ``start + due``; records its outcome whatever happens."""
    outcome, retry_after = "", False
    try:
        async with session.post(url, data=BODY,
                                headers={"Content-Type": "application/json"}) as answer:
            body = await answer.read()
            outcome, retry_after = str(answer.status), "Retry-After" in answer.headers
            if answer.status == 503 and b"gateway_overloaded" not in body:
                # relayed from the upstream, or another gateway 503 (circuit_open)
                outcome = "503 circuit_open" if b"circuit_open" in body else "503 upstream"
    except TimeoutError:
        outcome = "timeout"
    except aiohttp.ClientError as exc:
        outcome = type(exc).__name__
    finally:  # a cancelled request (drain deadline) is recorded too
        samples.append(Sample(outcome or "cancelled", due,
                              time.perf_counter() - start - due, retry_after))


async def open_loop(url: str, args: argparse.Namespace) -> list[Sample]:
    """``rate * duration`` requests, each started when due; then wait for the answers
    (at most ``timeout`` + 5 s) and cancel whatever is left."""
    samples: list[Sample] = []
    tasks: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=args.connections)
    # ceil_threshold: aiohttp would round a deadline over 5 s up to a whole second.
    timeout = aiohttp.ClientTimeout(total=args.timeout, ceil_threshold=args.timeout + 1)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        try:
            for index in range(int(args.rate * args.duration)):
                due = index / args.rate
                wait = start + due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                task = asyncio.create_task(one(session, url, start, due, samples))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks), timeout=args.timeout + 5)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return samples


# --- measuring one target ---------------------------------------------------------------


def _pct(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000, 1)


def summarize(samples: list[Sample], duration: float) -> dict[str, Any]:
    """Counts and latencies per outcome; goodput is 200 answers per second from the start
    until the last 200 answer arrived (answers keep coming after the sending window)."""
    ok = sorted(s.seconds for s in samples if s.outcome == "200")
    span = max((s.due + s.seconds for s in samples if s.outcome == "200"), default=duration)
    shed = sorted(s.seconds for s in samples if s.outcome == "503")
    by_second: dict[int, list[float]] = {}
    for s in samples:
        if s.outcome == "200":
            by_second.setdefault(int(s.due), []).append(s.seconds)
    return {
        "offered": len(samples), "ok": len(ok), "goodput_rps": round(len(ok) / span, 1),
        "ok_p50_ms": _pct(ok, 0.5), "ok_p99_ms": _pct(ok, 0.99), "ok_max_ms": _pct(ok, 1.0),
        "shed": len(shed), "shed_p50_ms": _pct(shed, 0.5), "shed_p99_ms": _pct(shed, 0.99),
        "shed_retry_after": sum(1 for s in samples if s.outcome == "503" and s.retry_after),
        "other": dict(Counter(s.outcome for s in samples if s.outcome not in ("200", "503"))),
        "ok_p50_ms_by_second": [_pct(sorted(by_second.get(second, [])), 0.5)
                                for second in range(math.ceil(duration))],
    }


async def get_json(url: str) -> Any:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as answer:
        return await answer.json()


def start_pair(name: str, args: argparse.Namespace, workdir: Path,
               stack: contextlib.ExitStack) -> tuple[str, str]:
    """A fresh slow upstream and the proxy ``name`` in front of it, both registered on
    ``stack`` for stopping; returns the proxy's and the upstream's base URLs."""
    py, up, port = sys.executable, free_port(), free_port()
    upstream = Process(f"upstream-{name}", [
        py, "-m", "bench.overload", "--serve-upstream", str(up), "--base", str(args.base),
        "--step", str(args.step), "--knee", str(args.knee),
        "--reject-above", str(args.reject_above), "--reject-delay", str(args.reject_delay)],
        workdir, None)
    stack.callback(upstream.stop)
    wait_ready(upstream, f"http://127.0.0.1:{up}/v1/models")
    if name == "gateway":
        config = workdir / "gateway.yaml"
        # JSON is YAML. The breaker is off: this measures the limiter alone (the upstream's
        # 503s would open it and every answer would be circuit_open).
        config.write_bytes(orjson.dumps({"limits": LIMITS, "breaker": {"failures": 0}}))
        argv = [py, "-m", "proxy", "serve", "--config", str(config), "--upstream",
                f"http://127.0.0.1:{up}/v1", "--port", str(port), "--log-level", "WARNING"]
        ready = "/healthz"
    else:
        argv = [py, "-m", "bench.naive_proxy", "--upstream", f"http://127.0.0.1:{up}",
                "--port", str(port)]
        ready = "/v1/models"
    proxy = Process(name, argv, workdir, None)
    stack.callback(proxy.stop)
    wait_ready(proxy, f"http://127.0.0.1:{port}{ready}")
    return f"http://127.0.0.1:{port}", f"http://127.0.0.1:{up}"


async def measure(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One target on fresh processes, stopped before the next target starts."""
    with contextlib.ExitStack() as stack:
        base, upstream = start_pair(name, args, workdir, stack)  # blocks: nothing else runs
        samples = await open_loop(base + CHAT, args)
        result = summarize(samples, args.duration)
        result["upstream"] = await get_json(upstream + "/stats")
        if name == "gateway":
            health = await get_json(base + "/health")
            result["limiter"] = health["providers"][0]["concurrency"]
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        targets = {}
        for name in ("gateway", "naive"):
            print(f"overload: {name}", file=sys.stderr)
            targets[name] = await measure(name, args, Path(tmp))
    settings = {key: getattr(args, key) for key in
                ("rate", "duration", "connections", "timeout", "base", "step", "knee",
                 "reject_above", "reject_delay")}
    return {"settings": settings, "limits": LIMITS, "targets": targets}


# --- output and command line ------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "0"
    return "-" if value is None else str(value)


def markdown(report: dict[str, Any]) -> str:
    s, targets = report["settings"], report["targets"]
    cols = ["offered", "ok", "goodput_rps", "ok_p50_ms", "ok_p99_ms", "ok_max_ms", "shed",
            "shed_p50_ms", "shed_p99_ms", "shed_retry_after", "other"]
    lines = [f"Open loop {s['rate']:g} req/s for {s['duration']:g} s on <= {s['connections']} "
             f"connections, timeout {s['timeout']:g} s; upstream {s['base'] * 1000:g} ms + "
             f"{s['step'] * 1000:g} ms per request in flight beyond {s['knee']}, 429/503 "
             f"in {s['reject_delay'] * 1000:g} ms from {s['reject_above']}; gateway "
             f"limits {report['limits']}", "",
             "| target | " + " | ".join(cols) + " | upstream calls / rejected / max in flight |",
             "|---" * (len(cols) + 2) + "|"]
    for name, r in targets.items():
        up = r["upstream"]
        lines.append(f"| {name} | " + " | ".join(_cell(r[c]) for c in cols)
                     + f" | {up['calls']} / {up['rejected']} / {up['max_in_flight']} |")
    if "limiter" in targets.get("gateway", {}):
        lines += ["", f"Gateway limiter after the run: {_cell(targets['gateway']['limiter'])}"]
    seconds = range(max(len(r["ok_p50_ms_by_second"]) for r in targets.values()))
    lines += ["", "p50 ms of 200 answers by second of the run (when they were due):", "",
              "| target | " + " | ".join(f"{sec}-{sec + 1} s" for sec in seconds) + " |",
              "|---" * (len(seconds) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_cell(p50) for p50 in r["ok_p50_ms_by_second"])
              + " |" for name, r in targets.items()]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=400.0, help="offered req/s")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of sending")
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=10.0, help="per request, seconds")
    parser.add_argument("--base", type=float, default=0.05, help="upstream base latency, s")
    parser.add_argument("--step", type=float, default=0.01, help="s per request beyond knee")
    parser.add_argument("--knee", type=int, default=8, help="upstream's comfortable load")
    parser.add_argument("--reject-above", type=int, default=16,
                        help="in progress at which the upstream answers 429/503")
    parser.add_argument("--reject-delay", type=float, default=0.2,
                        help="seconds the upstream takes to answer 429/503")
    parser.add_argument("--json", action="store_true", help="print JSON, not Markdown")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.serve_upstream is not None:
        serve_upstream(args)
        return
    if not (0 < args.rate <= 5000 and 0 < args.duration <= 120 and 0 < args.timeout <= 60
            and 1 <= args.connections <= 4096):
        parser.error("need 0 < rate <= 5000, 0 < duration <= 120, 0 < timeout <= 60, "
                     "1 <= connections <= 4096")
    try:
        report = run_until_signal(run(args))
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as exc:  # a process that did not start
        print(f"overload: {exc}", file=sys.stderr)
        sys.exit(1)
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if args.json
          else markdown(report))


if __name__ == "__main__":
    main()
