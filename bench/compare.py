"""Direct vs gateway vs naive aiohttp proxy vs hello worlds vs nginx, in one run (issues
#3 and #11, "bench/").

Why one script: figures from separate runs drift with the machine's state, so every
target is measured in the same run, interleaved (the order rotates each round) and
repeated (``--rounds``); the table shows medians across rounds. Targets:

* ``direct``: the load generator against the mock upstream itself (no proxy at all);
* ``gateway``: ``python -m proxy serve --upstream ...`` (one worker, drop-in mode);
* ``naive``: ``bench/naive_proxy.py``, one shared ``ClientSession`` (the baseline);
* ``floor``: ``bench/floor_proxy.py``, a bare ``web.Application`` relaying through the
  gateway's own upstream client and nothing else: the ceiling for the gateway's design,
  so ``gateway/floor`` is what its features cost;
* ``hello_server``, ``hello_app`` (throughput only): ``bench/hello_server.py``, aiohttp's
  low-level ``web.Server`` answering the static upstream's bytes itself, and
  ``bench/hello_app.py``, the same behind a ``web.Application``: the stack's ceiling with
  no proxying (issue 11: the gateway at >= 50 % of ``hello_server``);
* ``server_client`` (not stream): ``bench/server_client_proxy.py``, ``web.Server`` relaying
  over a bare asyncio keep-alive client, the floor of any proxy on this stack;
* ``baseline`` (``--baseline DIR``): the same gateway command run from another checkout,
  so a change's cost is measured before/after in one run (``gateway/baseline``);
* ``nginx``: ``proxy_pass`` with upstream keep-alive (the compiled reference), when an
  ``nginx`` binary exists (PATH or /usr/sbin), else skipped with a note.

``--targets a,b`` measures only those (the upstream always runs); by default every target
that fits the scenario and can run here (``bench/targets.py``). The ratios are the
gateway's req/s over each other target's and each Python server's over ``hello_server``'s;
"issue 11 targets" judges gateway/naive (>= 2.5), gateway/hello_server (>= 0.5) and, in
the latency scenario, the gateway's added p50 (<= 0.1 ms) and p99 (<= 1 ms).

``--pin`` (needs ``taskset`` and 2 CPUs): the proxy under test runs on core 0, the load
generator and the mock upstream share core 1, so the proxy gets one whole core, as in
the issue's anchors. Each measurement also reports the CPU share (CPU seconds per second
of warm-up plus measurement) of the proxy and of the upstream: a proxy near 1.0 was the
bottleneck; upstream plus ``gen_cpu`` near 1.0 means core 1 was.

``--upstream static`` (throughput only) replaces the mock with an nginx that returns the
mock's chat completion as a constant: the aiohttp mock plus the generator saturate core
1 at about 12-15k req/s through any proxy, which caps nginx and would cap a gateway
aiming at 2.5x the naive proxy; the static upstream does not (about 60k req/s direct).

Scenarios: ``throughput`` (64 connections, closed loop, instant upstream, non-stream
chat POST), ``latency`` (upstream answers after 50 ms, open loop at ``--rate`` 1000
req/s on 128 connections; added latency vs direct), ``stream`` (8 chunks 10 ms apart,
open loop at ``--rate`` 200 streams/s; TTFB and inter-event gap vs direct).

Every process is started here on a free loopback port, waited for by bounded polling,
and stopped here (SIGTERM, 5 s, then SIGKILL) in ``finally``, on Ctrl-C too. RSS
(``VmRSS``, summed over nginx's master and worker) is read at idle and after all rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.load import LoadResult
from bench.procs import REPO, Process, free_port, nginx_argv, nginx_binary, wait_ready
from bench.static_answer import BODY, CONTENT_TYPE
from bench.targets import CHAT, SPECS, choose, issue11


@dataclass(frozen=True)
class Scenario:
    name: str
    connections: int
    stream: bool = False
    rate: float | None = None
    latency: float = 0.0
    interval: float = 0.0
    chunks: int = 8


def scenario(name: str, rate: float | None) -> Scenario:
    if name == "latency":
        return Scenario(name, 128, rate=rate or 1000.0, latency=0.05)
    if name == "stream":
        return Scenario(name, 64, stream=True, rate=rate or 200.0, interval=0.01)
    return Scenario(name, 64, rate=rate)


@dataclass
class Target:
    name: str
    url: str
    proc: Process | None  # the proxy under test; None for direct


def _static_answer() -> str:
    """An nginx ``return`` of the chat completion the mock would send, byte for byte (the
    hello world targets send the same ``bench.static_answer.BODY``)."""
    return f"default_type {CONTENT_TYPE}; return 200 '{BODY.decode()}';"


def start_all(sc: Scenario, args: argparse.Namespace, workdir: Path, pin: bool,
              stack: contextlib.ExitStack) -> tuple[Process, list[Target]]:
    """Start the upstream, then every chosen target (``bench.targets``) in front of it on
    the proxy's core; all registered for stopping. The upstream always runs: the hello
    targets ignore it, and its CPU share stays a column."""
    procs: dict[str, Process] = {}
    def launch(name: str, argv: list[str], core: int, port: int, ready: str,
               code: Path = REPO, body: bytes | None = None) -> str:
        procs[name] = proc = Process(name, argv, workdir, core if pin else None, code)
        stack.callback(proc.stop)
        wait_ready(proc, f"http://127.0.0.1:{port}{ready}", body)
        return f"http://127.0.0.1:{port}"
    up = free_port()
    if args.upstream == "static":
        argv = nginx_argv(workdir, "static", up, _static_answer())
    else:
        argv = [sys.executable, "-m", "proxy.mock", "--port", str(up), "--latency",
                str(sc.latency), "--chunks", str(sc.chunks), "--interval", str(sc.interval)]
    base = launch("upstream", argv, 1, up, "/v1/models")
    urls = {}
    for name in args.targets:
        spec, port = SPECS[name], free_port()
        if spec.argv is None:  # direct: the upstream itself
            urls[name] = base
            continue
        code = args.baseline if name == "baseline" else REPO
        urls[name] = launch(name, spec.argv(base, port, workdir), 0, port, spec.ready, code,
                            spec.ready_body)
    return procs["upstream"], [Target(name, url + CHAT, procs.get(name))
                               for name, url in urls.items()]


def measure(target: Target, upstream: Process, sc: Scenario, args: argparse.Namespace,
            pin: bool) -> dict[str, Any]:
    """One bounded run of ``bench/load.py`` in a subprocess (pinned to core 1 with --pin)."""
    argv = [sys.executable, "-m", "bench.load", "--url", target.url, "--json",
            "--connections", str(sc.connections), "--duration", str(args.duration),
            "--warmup", str(args.warmup)]
    argv += ["--stream"] if sc.stream else []
    argv += ["--rate", str(sc.rate)] if sc.rate else []
    argv = (["taskset", "-c", "1"] if pin else []) + argv
    cpu = [p.cpu_seconds() for p in (upstream, target.proc) if p is not None]
    done = subprocess.run(argv, capture_output=True, check=False, cwd=REPO,
                          timeout=args.duration + args.warmup + 90)
    busy = args.duration + args.warmup  # the generator's start-up costs no server CPU
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed on {target.name}: {done.stderr.decode()}")
    result = LoadResult.from_json(orjson.loads(done.stdout.splitlines()[-1]))
    used = [p.cpu_seconds() - before for p, before in
            zip((q for q in (upstream, target.proc) if q is not None), cpu, strict=True)]
    # CPU per request (the warm-up's requests estimated at the measured rate): on a shared
    # machine this moves less than req/s does when another process takes the core.
    per_request = (round(used[1] / (result.rps * busy) * 1e6, 1)
                   if len(used) > 1 and result.rps else None)
    return {"result": result, "upstream_cpu": round(used[0] / busy, 2),
            "proxy_cpu": round(used[1] / busy, 2) if len(used) > 1 else None,
            "proxy_us_per_req": per_request}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians across rounds of one target; errors summed."""
    results: list[LoadResult] = [run["result"] for run in runs]
    errors: dict[str, int] = {}
    for r in results:
        for kind, count in r.errors.items():
            errors[kind] = errors.get(kind, 0) + count
    summary: dict[str, Any] = {
        "rps": _median([r.rps for r in results]),
        "rps_range": f"{min(r.rps for r in results):.0f}-{max(r.rps for r in results):.0f}",
        **{key: _median([getattr(r.latency_ms, key) for r in results])
           for key in ("p50", "p90", "p99", "max", "mean")},
        "errors": errors, "gen_cpu": _median([r.client_cpu for r in results]),
        "upstream_cpu": _median([run["upstream_cpu"] for run in runs])}
    if runs[0]["proxy_cpu"] is not None:
        summary["proxy_cpu"] = _median([run["proxy_cpu"] for run in runs])
        summary["us_per_req"] = _median([run["proxy_us_per_req"] for run in runs])
    if results[0].ttfb_ms is not None:
        summary["ttfb_p50"] = _median([r.ttfb_ms.p50 for r in results if r.ttfb_ms])
        summary["ttfb_p99"] = _median([r.ttfb_ms.p99 for r in results if r.ttfb_ms])
        summary["gap"] = _median([r.gap_ms or 0.0 for r in results])
    return summary


def _throughput(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The gateway's req/s over each other target's; each other Python server's over the
    ``web.Server`` hello world's (its share of the stack's ceiling, issue 11's table)."""
    out: dict[str, float] = {}
    pairs = [("gateway", other) for other in SPECS if other != "gateway"]
    pairs += [(name, "hello_server") for name in
              ("hello_app", "server_client", "floor", "naive", "baseline")]
    for name, other in pairs:
        if name in summary and other in summary and summary[other]["rps"]:
            out[f"{name}/{other}"] = round(summary[name]["rps"] / summary[other]["rps"], 2)
    return out


def ratios(sc: Scenario, summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Throughput ratios (closed loop only: at a fixed rate there is none); CPU per
    request against the baseline; added latency vs direct."""
    out = {} if sc.rate else _throughput(summary)
    gateway, direct = summary.get("gateway"), summary.get("direct")
    base = summary.get("baseline")
    if gateway and base and gateway.get("us_per_req") and base.get("us_per_req"):
        out["CPU per request gateway/baseline"] = round(
            gateway["us_per_req"] / base["us_per_req"], 2)
    for name, s in summary.items():
        if direct and name != "direct":
            keys = ("ttfb_p50", "ttfb_p99", "gap") if sc.stream else ("p50", "p99", "mean")
            for key in keys:
                out[f"{name} +{key} ms"] = round(s[key] - direct[key], 3)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "0"
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown(report: dict[str, Any]) -> str:
    """The table for bench/RESULTS.md, with the settings that produced it."""
    sc = report["scenario"]
    cols = ["rps", "rps_range", "p50", "p90", "p99", "max", "mean"]
    cols += ["ttfb_p50", "ttfb_p99", "gap"] if sc["stream"] else []
    cols += ["proxy_cpu", "us_per_req", "upstream_cpu", "gen_cpu", "errors"]
    load = f"rate {sc['rate']:g} req/s" if sc["rate"] else "closed loop"
    body = (f"stream of {sc['chunks']} chunks {sc['interval'] * 1000:g} ms apart"
            if sc["stream"] else "non-stream")
    lines = [f"### {sc['name']}: {sc['connections']} connections, {load}, upstream latency "
             f"{sc['latency'] * 1000:g} ms, {body}; {report['rounds']} rounds x "
             f"{report['duration']:g} s, medians; pinned: {report['pinned']}", "",
             "| target | " + " | ".join(cols) + " | RSS idle -> after MB |",
             "|---" * (len(cols) + 2) + "|"]
    for name, s in report["targets"].items():
        rss = report["rss_mb"].get(name)
        mem = f"{rss['idle']} -> {rss['after']}" if rss else "-"
        lines.append(f"| {name} | " + " | ".join(_cell(s.get(c)) for c in cols)
                     + f" | {mem} |")
    lines += ["", "Latencies in ms. " + "; ".join(f"{k}: {v:g}" for k, v in
                                                  report["ratios"].items())]
    if report["issue11"]:
        lines += ["", "Issue 11 targets: " + "; ".join(
            f"{key} {t['value']:g} vs {t['target']} ({'met' if t['met'] else 'MISSED'})"
            for key, t in report["issue11"].items())]
    lines += [f"Note: {note}" for note in report["notes"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start everything, measure every target ``rounds`` times interleaved, stop all."""
    sc = scenario(args.scenario, args.rate)
    notes: list[str] = []
    pin = args.pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if args.pin and not pin:
        notes.append("--pin ignored: needs taskset and at least 2 CPUs")
    if nginx_binary() is None:
        notes.append("nginx skipped: no nginx binary on PATH or at /usr/sbin/nginx")
    if args.upstream == "static":
        notes.append("upstream: nginx returning a constant chat completion (not the mock)")
    notes += args.target_notes
    runs: dict[str, list[dict[str, Any]]] = {}
    rss: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp, \
            contextlib.ExitStack() as stack:
        upstream, targets = start_all(sc, args, Path(tmp), pin, stack)
        procs = {"upstream": upstream, **{t.name: t.proc for t in targets if t.proc}}
        idle = {name: p.rss_mb() for name, p in procs.items()}
        for round_ in range(args.rounds):
            shift = round_ % len(targets)
            for target in targets[shift:] + targets[:shift]:
                print(f"round {round_ + 1}/{args.rounds}: {target.name}", file=sys.stderr)
                runs.setdefault(target.name, []).append(
                    measure(target, upstream, sc, args, pin))
        rss = {n: {"idle": idle[n], "after": p.rss_mb()} for n, p in procs.items()}
    summary = {t.name: summarize(runs[t.name]) for t in targets}
    found = ratios(sc, summary)
    return {"scenario": vars(sc), "rounds": args.rounds, "duration": args.duration,
            "pinned": "proxy core 0; generator + upstream core 1" if pin else "no",
            "targets": summary, "ratios": found, "issue11": issue11(sc.name, found),
            "rss_mb": rss,
            "notes": notes, "runs": {n: [{**r, "result": r["result"].to_json()} for r in rs]
                                     for n, rs in runs.items()}}


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind through every ``finally``, stopping what we started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("throughput", "latency", "stream"),
                        default="throughput")
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 21), metavar="1-20")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each")
    parser.add_argument("--rate", type=float, help="offered req/s (latency, stream)")
    parser.add_argument("--pin", action="store_true", help="taskset: proxy core 0, rest 1")
    parser.add_argument("--upstream", choices=("mock", "static"), default="mock",
                        help="static: nginx answering a constant chat completion, so the "
                             "upstream never caps a proxy (throughput only)")
    parser.add_argument("--json", action="store_true", help="print JSON, not Markdown")
    parser.add_argument("--baseline", type=Path, metavar="DIR",
                        help="also measure the gateway of another checkout (e.g. a git "
                             "worktree of the commit before a change): target 'baseline'")
    parser.add_argument("--targets", metavar="A,B,...",
                        help=f"measure only these (default: every one that fits the "
                             f"scenario and can run here): {', '.join(SPECS)}")
    args = parser.parse_args(argv)
    try:
        args.targets, args.target_notes = choose(
            args.targets, args.scenario, baseline=args.baseline is not None,
            nginx=nginx_binary() is not None)
    except ValueError as exc:
        parser.error(f"--targets: {exc}")
    if not 0 < args.duration <= 600:
        parser.error("--duration must be in (0, 600]")
    if args.baseline is not None and not (args.baseline / "proxy" / "__main__.py").is_file():
        parser.error(f"--baseline {args.baseline}: not a checkout of this project")
    if args.upstream == "static" and (args.scenario != "throughput" or not nginx_binary()):
        parser.error("--upstream static needs nginx and the throughput scenario")
    for signum in (signal.SIGINT, signal.SIGTERM):  # even if a shell set SIGINT ignored
        signal.signal(signum, _raise_interrupt)
    try:
        report = run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as exc:  # a process that did not start, a failed measurement
        print(f"compare: {exc}", file=sys.stderr)
        sys.exit(1)
    show: Callable[[dict[str, Any]], str] = (
        (lambda r: orjson.dumps(r, option=orjson.OPT_INDENT_2).decode()) if args.json
        else markdown)
    print(show(report))


if __name__ == "__main__":
    main()
