"""What ``bench/compare.py`` can measure: each target's command, readiness check and the
scenarios it makes sense in, and issue 11's targets judged on a run's ratios.

Why a table: issue 11's comparison has nine rows (the upstream direct, four proxies,
two hello worlds, a minimal proxy, nginx), and ``--targets`` picks any subset; one entry
per target keeps starting them uniform (free loopback port, the proxy's core with
``--pin``, bounded readiness polling) and keeps ``compare.py`` about measuring.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.procs import nginx_argv
from bench.static_answer import PROMPT

CHAT = "/v1/chat/completions"
SCENARIOS = frozenset({"throughput", "latency", "stream"})
# (upstream base URL, this target's port, the run's work directory) -> command line
Argv = Callable[[str, int, Path], list[str]]
READY_POST = b'{"model": "mock-gpt", "messages": [{"role": "user", "content": "%s"}]}' % (
    PROMPT.encode())


def _module(name: str, *, upstream: bool = True) -> Argv:
    """``python -m bench.<name> [--upstream BASE] --port PORT``."""
    def argv(base: str, port: int, workdir: Path) -> list[str]:
        via = ["--upstream", base] if upstream else []
        return [sys.executable, "-m", f"bench.{name}", *via, "--port", str(port)]
    return argv


def _gateway(base: str, port: int, workdir: Path) -> list[str]:
    return [sys.executable, "-m", "proxy", "serve", "--upstream", f"{base}/v1",
            "--port", str(port)]


def _proxy_pass(upstream_port: int) -> tuple[str, str]:
    """nginx as a reverse proxy: upstream keep-alive, streams unbuffered (deploy/ does too)."""
    extra = (f"upstream mock {{ server 127.0.0.1:{upstream_port}; keepalive 256; "
             "keepalive_requests 1000000; }")
    return ('proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection "";'
            " proxy_buffering off; proxy_read_timeout 300s;", extra)


def _nginx(base: str, port: int, workdir: Path) -> list[str]:
    return nginx_argv(workdir, "nginx", port, *_proxy_pass(urlsplit(base).port or 80))


@dataclass(frozen=True)
class Spec:
    """One target. ``argv`` None: the upstream itself (``direct``). ``ready_body``: the
    readiness poll POSTs it (a target with no GET route)."""

    name: str
    argv: Argv | None
    ready: str = "/v1/models"
    scenarios: frozenset[str] = SCENARIOS
    ready_body: bytes | None = None


_NON_STREAM = frozenset({"throughput", "latency"})
SPECS = {spec.name: spec for spec in (
    Spec("direct", None),
    Spec("gateway", _gateway, "/healthz"),
    Spec("naive", _module("naive_proxy")),
    Spec("floor", _module("floor_proxy")),
    # No upstream: an instant constant answer only compares with an instant upstream.
    Spec("hello_server", _module("hello_server", upstream=False),
         scenarios=frozenset({"throughput"})),
    Spec("hello_app", _module("hello_app", upstream=False), CHAT,
         frozenset({"throughput"}), READY_POST),
    Spec("server_client", _module("server_client_proxy"), scenarios=_NON_STREAM),  # no chunked
    Spec("baseline", _gateway, "/healthz"),  # the gateway command, another checkout's code
    Spec("nginx", _nginx),
)}


def choose(listed: str | None, scenario: str, *, baseline: bool,
           nginx: bool) -> tuple[list[str], list[str]]:
    """The targets to measure, in table order, and notes on those left out. Default
    (``listed`` None): every target that fits ``scenario`` and can run here. A listed
    target that cannot is a ``ValueError`` (the command line's error)."""
    available = {"baseline": baseline, "nginx": nginx}
    if listed is None:
        names, notes = [], []
        for name, spec in SPECS.items():
            if scenario in spec.scenarios and available.get(name, True):
                names.append(name)
            elif scenario not in spec.scenarios:
                notes.append(f"{name}: not measured in the {scenario} scenario")
        return names, notes
    wanted = [name.strip() for name in listed.split(",") if name.strip()]
    problems = [f"unknown target {name!r} (known: {', '.join(SPECS)})"
                for name in wanted if name not in SPECS]
    problems += [f"{name} does not fit the {scenario} scenario" for name in wanted
                 if name in SPECS and scenario not in SPECS[name].scenarios]
    problems += [f"{name} cannot run here: " + ("needs --baseline DIR" if name == "baseline"
                                                else "no nginx binary")
                 for name in wanted if not available.get(name, True)]
    if problems or not wanted:
        raise ValueError("; ".join(problems) or "--targets lists no target")
    return [name for name in SPECS if name in wanted], []


# Issue 11: "gateway >= 2.5x naive and >= 50 % of the web.Server hello world"; "added
# latency at 1,000 req/s against a 50 ms upstream p50 <= 0.1 ms, p99 <= 1 ms".
_AT_LEAST = {"gateway/naive": 2.5, "gateway/hello_server": 0.5}
_AT_MOST = {"gateway +p50 ms": 0.1, "gateway +p99 ms": 1.0}


def issue11(scenario: str, ratios: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Each issue 11 target this run's ratios can judge: value, target, met. The latency
    targets only in the latency scenario (closed loop, added latency is queueing)."""
    judged: dict[str, dict[str, Any]] = {}
    for key, floor in _AT_LEAST.items():
        if key in ratios:
            judged[key] = {"value": ratios[key], "target": f">= {floor:g}",
                           "met": ratios[key] >= floor}
    for key, ceiling in _AT_MOST.items():
        if key in ratios and scenario == "latency":
            judged[key] = {"value": ratios[key], "target": f"<= {ceiling:g}",
                           "met": ratios[key] <= ceiling}
    return judged
