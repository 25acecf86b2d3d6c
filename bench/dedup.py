"""N identical concurrent requests against a slow upstream: how many reach it (issue #3).

Why: identical deterministic requests (``temperature: 0``) in flight at the same time
should share one upstream call (target: 50 -> 1), also with several workers, whose
in-flight maps are per process, and through the shipped ``deploy/nginx.conf``, which
spreads connections over the workers with ``least_conn``.

How: an upstream defined here, in this process, counts its chat calls and answers each
after ``--latency`` (200 ms). For each configuration a fresh gateway is started on a free
loopback port with the response cache off (so no answer can come from a cache), the
``--requests`` (50) identical requests are sent at once, each on its own connection, and
the gateway is stopped:

* ``dedup``: one worker, default dedup (``mode: deterministic``);
* ``no-dedup``: one worker, ``dedup: {mode: off}`` (the baseline: N upstream calls);
* ``2 workers``: ``--workers 2`` on one port (SO_REUSEPORT); a worker that does not own
  a request's key forwards it to the one that does (``proxy/sharing/peers.py``);
* ``nginx + 2 workers``: the shipped ``deploy/nginx.conf`` (only the certificate, the
  port, the socket directory and temp paths substituted: unlike ``tests/test_nginx.py``,
  which runs the file as shipped on /run/proxy, a benchmark must not disturb a gateway
  the user runs there; plus one measurement-only ``add_header`` naming the worker nginx
  chose) in front of ``--workers 2 --socket-dir``, over HTTPS with a throwaway certificate (not
  verified); skipped when no nginx binary is found.

How to read the table: ``upstream calls`` is what the upstream counted; ``statuses``
every answer's status; ``leader/follower`` the ``X-Gateway-Dedup`` headers; latencies
are client-side, from the moment all requests were started (about ``--latency`` plus
the gateway's work when deduplicated). ``per worker`` shows the spread over the workers:
for SO_REUSEPORT, the client connections each worker held 100 ms into the burst (its
socket inodes matched with ``/proc/net/tcp``); for nginx, the worker socket nginx
named for each request (``$upstream_addr``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench.memory import run_until_signal, socket_inodes, tcp_inodes
from bench.procs import REPO, Process, free_port, make_certificate, nginx_binary
from bench.targets import CHAT

SHIPPED_NGINX = REPO / "deploy" / "nginx.conf"
BODY = orjson.dumps({"model": "mock-gpt", "temperature": 0, "messages": [
    {"role": "user", "content": "Name one prime number."}]})
_READY_TIMEOUT = 20.0


@dataclass
class Upstream:
    """The counting upstream's state, read between configurations."""

    latency: float
    calls: int = 0
    url: str = ""


def counting_app(upstream: Upstream) -> web.Application:
    """Chat completions answered after ``upstream.latency`` and counted; a model list for
    the gateway's discovery at start-up (not counted)."""
    answer = orjson.dumps({
        "id": "chatcmpl-dedup", "object": "chat.completion", "created": 0,
        "model": "mock-gpt", "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "Seven."}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})
    models = orjson.dumps({"object": "list", "data": [
        {"id": "mock-gpt", "object": "model", "created": 0, "owned_by": "bench"}]})

    async def chat(request: web.Request) -> web.Response:
        upstream.calls += 1
        await request.read()
        await asyncio.sleep(upstream.latency)
        return web.Response(body=answer, content_type="application/json")

    async def list_models(request: web.Request) -> web.Response:
        return web.Response(body=models, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", list_models)
    return app


@dataclass
class Target:
    """One configuration: where clients send to, the gateway's port and its workers."""

    name: str
    url: str
    port: int
    workers: dict[int, int]  # index by pid
    tls: bool = False


def write_config(workdir: Path, dedup: str) -> Path:
    path = workdir / f"gateway-{dedup}.yaml"
    # JSON is YAML, and keeps "off" a string (YAML 1.1 would read a bare off as false).
    path.write_bytes(orjson.dumps({"dedup": {"mode": dedup}, "cache": {"enabled": False}}))
    return path


def start_gateway(workdir: Path, upstream: Upstream, dedup: str,
                  extra: list[str]) -> tuple[Process, int]:
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "serve", "--config",
            str(write_config(workdir, dedup)), "--upstream", upstream.url, "--port", str(port),
            "--log-level", "WARNING", *extra]
    return Process(f"gateway-{port}", argv, workdir, None), port


async def wait_workers(proc: Process, url: str, count: int,
                       verify: bool = True) -> dict[int, int]:
    """Poll ``url`` (a ``/healthz``), each time on a new connection, until ``count``
    distinct workers have answered; raise if the process exits or 20 s pass. Returns
    each worker's index by pid."""
    seen: dict[int, int] = {}
    connector = aiohttp.TCPConnector(force_close=True, ssl=verify)
    timeout = aiohttp.ClientTimeout(total=2)
    deadline = time.monotonic() + _READY_TIMEOUT
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        while len(seen) < count:
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{proc.name}: {len(seen)} of {count} workers ready "
                                   f"(exit code {proc.popen.returncode}):\n{proc.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url) as answer:
                    if answer.status == 200:
                        health = await answer.json()
                        seen[health["pid"]] = health["worker"]
                        continue
            await asyncio.sleep(0.05)
    return seen


def _sub(pattern: str, replacement: str, text: str) -> str:
    new, count = re.subn(pattern, lambda _: replacement, text, flags=re.MULTILINE)
    if not count:
        raise RuntimeError(f"deploy/nginx.conf no longer has {pattern!r}: update bench/dedup.py")
    return new


def render_nginx(prefix: Path, port: int, sockets: Path) -> Path:
    """The shipped config with this run's paths and port (its own socket directory),
    plus ``X-Bench-Worker: $upstream_addr`` so the client sees which worker was chosen."""
    cert, key = make_certificate(prefix)
    text = SHIPPED_NGINX.read_text()
    text = _sub(r"listen\s+443\b", f"listen 127.0.0.1:{port}", text)
    text = _sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", text)
    text = _sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", text)
    text = _sub(r"unix:/run/proxy/", f"unix:{sockets}/", text)
    text = _sub(r"proxy_pass\s+http://llm_gateway;",
                "proxy_pass http://llm_gateway; add_header X-Bench-Worker $upstream_addr always;",
                text)
    temp = "".join(f"    {kind}_temp_path {prefix}/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = _sub(r"^http\s*\{\n", "http {\n" + temp, text)
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


def nginx_process(workdir: Path, port: int, sockets: Path) -> Process:
    binary = nginx_binary()
    assert binary is not None
    prefix = workdir / "nginx"
    prefix.mkdir()
    main = f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log warn;"
    main += " user root;" if os.geteuid() == 0 else ""  # else its workers become "nobody"
    return Process("nginx", [binary, "-p", str(prefix), "-e", str(prefix / "error.log"),
                             "-c", str(render_nginx(prefix, port, sockets)), "-g", main],
                   workdir, None)


async def start_target(name: str, workdir: Path, upstream: Upstream,
                       stack: contextlib.AsyncExitStack) -> Target:
    """Start one configuration's processes (stopped by ``stack``) and wait for them."""
    workers = 1 if name in ("dedup", "no-dedup") else 2
    extra = ["--workers", "2"] if workers == 2 else []
    # Short, for unix socket paths (<= 107 bytes); removed after the gateway stopped.
    sockets = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-dd-")))
    extra += ["--socket-dir", str(sockets)] if name == "nginx + 2 workers" else []
    gateway, port = start_gateway(workdir, upstream, "off" if name == "no-dedup"
                                  else "deterministic", extra)
    stack.callback(gateway.stop)
    pids = await wait_workers(gateway, f"http://127.0.0.1:{port}/healthz", workers)
    if name != "nginx + 2 workers":
        return Target(name, f"http://127.0.0.1:{port}{CHAT}", port, pids)
    nginx_port = free_port()
    nginx = nginx_process(workdir, nginx_port, sockets)
    stack.callback(nginx.stop)
    base = f"https://127.0.0.1:{nginx_port}"
    await wait_workers(nginx, f"{base}/healthz", workers, verify=False)
    return Target(name, f"{base}{CHAT}", port, pids, tls=True)


@dataclass
class Reply:
    status: int | str
    seconds: float
    role: str
    worker: str


async def send(session: aiohttp.ClientSession, url: str, started: float) -> Reply:
    """One request on its own connection; a failure is a ``Reply`` naming the error."""
    try:
        async with session.post(url, data=BODY,
                                headers={"Content-Type": "application/json"}) as answer:
            await answer.read()
            worker = answer.headers.get("X-Bench-Worker", "")
            return Reply(answer.status, time.perf_counter() - started,
                         answer.headers.get("X-Gateway-Dedup", "-"),
                         worker.rsplit("/", 1)[-1].removesuffix(".sock"))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Reply(type(exc).__name__, time.perf_counter() - started, "-", "")


def client_connections(target: Target) -> dict[str, int]:
    """Client TCP connections held by each worker right now (``/proc/net/tcp`` inodes)."""
    conns = tcp_inodes(target.port, local=True)
    return {f"worker-{index}": len(socket_inodes(pid) & conns)
            for pid, index in sorted(target.workers.items(), key=lambda item: item[1])}


async def burst(target: Target, count: int) -> tuple[list[Reply], dict[str, int]]:
    """``count`` identical requests started together, each on a fresh connection; for
    SO_REUSEPORT workers the connections each worker holds 100 ms in are sampled."""
    verify = not target.tls  # the throwaway certificate is not verified
    connector = aiohttp.TCPConnector(limit=0, force_close=True, ssl=verify)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        sends = [asyncio.ensure_future(send(session, target.url, started))
                 for _ in range(count)]
        spread: dict[str, int] = {}
        try:
            if len(target.workers) > 1 and not target.tls:
                await asyncio.sleep(0.1)
                spread = client_connections(target)
            replies = await asyncio.gather(*sends)
        finally:  # interrupted: no request outlives the session
            for future in sends:
                future.cancel()
            await asyncio.gather(*sends, return_exceptions=True)
    if target.tls:
        spread = dict(sorted(Counter(r.worker for r in replies).items()))
    return replies, spread


def _ms(ordered: list[float], q: float) -> float:
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000, 1)


def summarize(replies: list[Reply], calls: int, spread: dict[str, int]) -> dict[str, Any]:
    seconds = sorted(r.seconds for r in replies)
    roles = Counter(r.role for r in replies)
    return {"requests": len(replies), "upstream_calls": calls,
            "statuses": dict(Counter(str(r.status) for r in replies)),
            "leader": roles.get("leader", 0), "follower": roles.get("follower", 0),
            "p50_ms": _ms(seconds, 0.5), "max_ms": _ms(seconds, 1.0), "per_worker": spread}


async def measure(name: str, workdir: Path, upstream: Upstream, count: int) -> dict[str, Any]:
    """One configuration on fresh processes, stopped before the next one starts."""
    async with contextlib.AsyncExitStack() as stack:
        target = await start_target(name, workdir, upstream, stack)
        before = upstream.calls
        replies, spread = await burst(target, count)
        return summarize(replies, upstream.calls - before, spread)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    upstream = Upstream(args.latency)
    runner = web.AppRunner(counting_app(upstream), access_log=None)
    await runner.setup()
    names = ["dedup", "no-dedup", "2 workers", "nginx + 2 workers"]
    notes = []
    if nginx_binary() is None:
        names.pop()
        notes.append("nginx + 2 workers skipped: no nginx binary on PATH or at /usr/sbin")
    results: dict[str, dict[str, Any]] = {}
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        upstream.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
            for name in names:
                print(f"dedup: {name}", file=sys.stderr)
                results[name] = await measure(name, Path(tmp), upstream, args.requests)
    finally:
        await runner.cleanup()
    return {"requests": args.requests, "latency_s": args.latency, "configs": results,
            "notes": notes}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"{report['requests']} identical concurrent requests (`temperature: 0`), "
             f"upstream latency {report['latency_s'] * 1000:g} ms, cache off, "
             "one fresh gateway per row", "",
             "| config | upstream calls | statuses | leader/follower | p50 ms | max ms "
             "| per worker |", "|---|---|---|---|---|---|---|"]
    for name, r in report["configs"].items():
        statuses = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        spread = ", ".join(f"{k}: {v}" for k, v in r["per_worker"].items()) or "-"
        lines.append(f"| {name} | {r['upstream_calls']} | {statuses} | {r['leader']}/"
                     f"{r['follower']} | {r['p50_ms']} | {r['max_ms']} | {spread} |")
    lines += [f"Note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dedup", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50, help="identical requests")
    parser.add_argument("--latency", type=float, default=0.2, help="upstream seconds")
    parser.add_argument("--json", action="store_true", help="print JSON, not Markdown")
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 1000 or not 0 <= args.latency <= 10:
        parser.error("--requests must be in 1..1000 and --latency in [0, 10]")
    try:
        report = run_until_signal(run(args))
    except KeyboardInterrupt:
        sys.exit(130)
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"dedup: {exc}", file=sys.stderr)
        sys.exit(1)
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() if args.json
          else markdown(report))


if __name__ == "__main__":
    main()
