"""Issue 11's benchmark targets (``bench/hello_server.py``, ``bench/hello_app.py``,
``bench/server_client_proxy.py``), ``bench.compare --targets`` and ``bench.memory --long``.

Each script is started as a user starts it (``python -m bench.X --port P``) on a free
loopback port and asked for a chat completion by the official ``openai`` SDK; the
benchmark scripts run in a subprocess with bounds small enough for a few seconds, and the
test reads their JSON report. Every process is started through ``bench.procs.Process``
and stopped by its own ``Popen`` in a ``finally``; a script that overruns gets SIGINT
(its own clean shutdown stops its children), then SIGKILL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from bench import targets
from bench.memory import socket_inodes, tcp_inodes
from bench.procs import READY_TIMEOUT, REPO, Process, free_port, nginx_binary, wait_ready
from bench.static_answer import BODY, PROMPT
from proxy.mock import payloads
from tests.bench_runs import bench

MESSAGES: Any = [{"role": "user", "content": PROMPT}]


@contextmanager
def serving(tmp_path: Path, module: str, *args: str, ready: str = "/v1/models",
            body: bytes | None = None) -> Iterator[tuple[str, Process]]:
    """``python -m <module> *args --port P`` until the block ends; its base URL."""
    port = free_port()
    proc = Process(module.rsplit(".", 1)[-1], [sys.executable, "-m", module, *args,
                                               "--port", str(port)], tmp_path, None)
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}{ready}", body)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.stop()


def chat(base: str) -> str:
    """One non-stream chat completion through the openai SDK; the answer's text."""
    with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                       timeout=10) as client:
        answer = client.chat.completions.create(model="mock-gpt", messages=MESSAGES)
    assert answer.object == "chat.completion"
    return answer.choices[0].message.content or ""


def post(url: str, body: bytes = targets.READY_POST) -> tuple[int, bytes] | None:
    """Status and body of one JSON POST; ``None`` if nothing answers (refused)."""
    request = urllib.request.Request(url, data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except urllib.error.URLError:
        return None


# --- the scripts ------------------------------------------------------------------------


def test_hello_server_answers_the_static_upstreams_bytes(tmp_path: Path) -> None:
    with serving(tmp_path, "bench.hello_server") as (base, _):
        assert chat(base) == payloads.answer_for(PROMPT)
        # Every path and method: the same bytes the static nginx upstream returns.
        assert post(f"{base}/anything") == (200, BODY)


def test_hello_app_answers_on_its_one_post_route(tmp_path: Path) -> None:
    with serving(tmp_path, "bench.hello_app", ready=targets.CHAT,
                 body=targets.READY_POST) as (base, _):
        assert chat(base) == payloads.answer_for(PROMPT)
        assert post(f"{base}{targets.CHAT}") == (200, BODY)
        assert post(f"{base}/v1/models") == (404, b"404: Not Found")  # one route only


def test_server_client_relays_to_the_mock_upstream(tmp_path: Path) -> None:
    with serving(tmp_path, "proxy.mock") as (upstream, _), \
            serving(tmp_path, "bench.server_client_proxy", "--upstream", upstream) as (
                base, relay):
        for _ in range(3):
            assert chat(base) == payloads.answer_for(PROMPT)
        # One after another, the three (and the readiness GET) went over one kept-alive
        # upstream connection: the pool gave it back each time.
        upstream_port = int(upstream.rsplit(":", 1)[1])
        held = socket_inodes(relay.popen.pid) & tcp_inodes(upstream_port, local=False)
        assert len(held) == 1
        # A chunked answer (a stream) is beyond this client: 502, not a hang.
        stream = json.dumps({"model": "mock-gpt", "messages": MESSAGES, "stream": True})
        status, text = post(f"{base}{targets.CHAT}", stream.encode()) or (0, b"")
        assert status == 502 and b"Content-Length" in text


def test_server_client_answers_502_when_the_upstream_is_down(tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    port = free_port()
    proc = Process("relay", [sys.executable, "-m", "bench.server_client_proxy", "--upstream",
                             f"http://127.0.0.1:{closed}", "--port", str(port)], tmp_path, None)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while (answer := post(f"http://127.0.0.1:{port}{targets.CHAT}")) is None:
            assert proc.popen.poll() is None, proc.tail()
            assert time.monotonic() < deadline, "relay not listening"
            time.sleep(0.05)
        status, text = answer
        assert status == 502 and b"unreachable" in text
    finally:
        proc.stop()


# --- target selection and issue 11's verdicts --------------------------------------------


def test_default_targets_fit_the_scenario() -> None:
    throughput, _ = targets.choose(None, "throughput", baseline=False, nginx=True)
    assert throughput == ["direct", "gateway", "naive", "floor", "hello_server", "hello_app",
                          "server_client", "nginx"]
    stream, notes = targets.choose(None, "stream", baseline=True, nginx=False)
    assert stream == ["direct", "gateway", "naive", "floor", "baseline"]
    assert len(notes) == 3 and all("stream scenario" in note for note in notes)
    listed, _ = targets.choose("naive, hello_server", "throughput", baseline=False,
                               nginx=False)
    assert listed == ["naive", "hello_server"]  # table order, spaces allowed


@pytest.mark.parametrize(("listed", "scenario"), [
    ("bogus", "throughput"), ("baseline", "throughput"), ("nginx", "throughput"),
    ("hello_app", "latency"), ("server_client", "stream"), (",", "throughput")])
def test_targets_that_cannot_be_measured_are_refused(listed: str, scenario: str) -> None:
    with pytest.raises(ValueError, match=r"unknown|fit|cannot run|no target"):
        targets.choose(listed, scenario, baseline=False, nginx=False)


def test_issue11_verdicts() -> None:
    ratios = {"gateway/naive": 2.6, "gateway/hello_server": 0.4, "gateway +p50 ms": 0.05,
              "gateway +p99 ms": 1.5}
    judged = targets.issue11("latency", ratios)
    assert {k: v["met"] for k, v in judged.items()} == {
        "gateway/naive": True, "gateway/hello_server": False, "gateway +p50 ms": True,
        "gateway +p99 ms": False}
    assert set(targets.issue11("throughput", ratios)) == {"gateway/naive",
                                                          "gateway/hello_server"}


# --- the benchmark scripts, run as a user runs them --------------------------------------


NEW = ("hello_server", "hello_app", "server_client", "naive")


def test_compare_measures_the_chosen_targets() -> None:
    static = ("--upstream", "static") if nginx_binary() is not None else ()
    report = bench("compare", "--scenario", "throughput", "--rounds", "1", "--duration",
                   "0.5", "--warmup", "0.2", "--targets", ",".join(NEW), *static, "--json",
                   timeout=45)
    # Only those, in the table's order (bench/targets.py), whatever --targets' order.
    assert list(report["targets"]) == ["naive", "hello_server", "hello_app", "server_client"]
    for name in NEW:
        assert report["targets"][name]["rps"] > 0, report["targets"][name]
        assert report["targets"][name]["errors"] == {}, report["targets"][name]
    shares = {f"{name}/hello_server" for name in ("hello_app", "server_client", "naive")}
    assert set(report["ratios"]) == shares  # no gateway measured: no gateway/... ratio
    assert all(value > 0 for value in report["ratios"].values())
    assert report["issue11"] == {}
    assert {"upstream", *NEW} == set(report["rss_mb"])
    assert any("constant chat completion" in n for n in report["notes"]) == bool(static)


def test_compare_refuses_a_target_the_scenario_cannot_measure() -> None:
    done = subprocess.run([sys.executable, "-m", "bench.compare", "--scenario", "stream",
                           "--targets", "gateway,hello_server"], cwd=REPO,
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 2
    assert b"hello_server does not fit the stream scenario" in done.stderr


def test_memory_long_run_samples_until_max_seconds() -> None:
    report = bench("memory", "--long", "--requests", "10000000", "--sample-every", "300",
                   "--max-seconds", "3", "--json", timeout=45)
    samples = report["samples"]
    assert samples, report
    assert [s["requests"] for s in samples] == [300 * n for n in range(1, len(samples) + 1)]
    assert all(s["errors"] == {} and s["rss_mb"] > 0 for s in samples)
    assert samples[0]["since_first_mb"] == 0.0
    growth = max(s["rss_mb"] for s in samples) - samples[0]["rss_mb"]
    assert report["growth_after_first_mb"] == pytest.approx(growth, abs=0.11)
    assert report["flat"] is (report["growth_after_first_mb"] <= 2.0)
    assert report["stopped"].startswith("--max-seconds 3 reached after")
    assert report["targets"]["all requests sent"] is False
    assert report["idle"]["rss_mb"] > 0
