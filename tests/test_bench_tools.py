"""The benchmark scripts in ``bench/`` run for real, as a user runs them, with tiny bounds.

README: users "load-test the gateway with the scripts in bench/", so each script must
keep working on a fresh machine. Each test runs ``python -m bench.X ... --json`` in a
subprocess with parameters small enough for a few seconds, and asserts on what the
report says (every target measured, no errors, the figure the script exists to show),
not only on the exit status. The scripts start and stop their own children; a script
that overruns its timeout gets SIGINT (its own clean shutdown, which stops what it
started), then SIGKILL. The one process this file starts itself, a ``python -m proxy.mock``
for ``bench.load``, is stopped by its ``Popen``. Only parts that need nginx are skipped,
and only when no nginx binary exists.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from bench.procs import nginx_binary
from tests.bench_runs import REPO, bench, bench_env

HAS_NGINX = nginx_binary() is not None
needs_nginx = pytest.mark.skipif(not HAS_NGINX, reason="no nginx binary on PATH or /usr/sbin")


# --- compare.py: every target, one round ------------------------------------------------


PY_TARGETS = {"direct", "gateway", "naive", "floor"}  # issue 11's: test_bench_targets.py


@pytest.fixture(scope="module")
def compare_throughput() -> Any:
    targets = ",".join(sorted(PY_TARGETS | ({"nginx"} if HAS_NGINX else set())))
    return bench("compare", "--scenario", "throughput", "--rounds", "1", "--duration", "0.5",
                 "--warmup", "0.2", "--json", "--targets", targets, timeout=45)


def _assert_measured(report: Any, names: set[str]) -> None:
    for name in names:
        target = report["targets"][name]
        assert target["rps"] > 0, (name, target)
        assert target["errors"] == {}, (name, target)
        assert len(report["runs"][name]) == 1  # --rounds 1


def test_compare_throughput_measures_every_python_target(compare_throughput: Any) -> None:
    report = compare_throughput
    assert set(report["targets"]) == PY_TARGETS | ({"nginx"} if HAS_NGINX else set())
    _assert_measured(report, PY_TARGETS)
    assert {"gateway/direct", "gateway/naive", "gateway/floor"} <= set(report["ratios"])
    assert report["ratios"]["gateway/naive"] > 0
    assert report["scenario"]["name"] == "throughput"
    assert report["rounds"] == 1 and report["duration"] == 0.5
    # RSS of every process compare started, at idle and after the rounds.
    assert {"upstream", "gateway", "naive", "floor"} <= set(report["rss_mb"])
    assert all(rss["idle"] > 0 and rss["after"] > 0 for rss in report["rss_mb"].values())


@needs_nginx
def test_compare_throughput_measures_nginx(compare_throughput: Any) -> None:
    _assert_measured(compare_throughput, {"nginx"})
    assert compare_throughput["ratios"]["gateway/nginx"] > 0
    assert not any("nginx skipped" in note for note in compare_throughput["notes"])


def test_compare_stream_reports_ttfb_for_every_target() -> None:
    report = bench("compare", "--scenario", "stream", "--rounds", "1", "--duration", "0.5",
                   "--warmup", "0.2", "--rate", "100", "--json", timeout=45)
    names = PY_TARGETS | ({"nginx"} if HAS_NGINX else set())
    assert set(report["targets"]) == names
    _assert_measured(report, names)
    # 8 chunks 10 ms apart: through a relaying target the first body byte comes well
    # before the whole answer. Not through floor: it reads the whole upstream answer
    # before it answers (bench/floor_proxy.py), so its TTFB is its latency.
    for name in names - {"floor"}:
        target = report["targets"][name]
        assert 0 < target["ttfb_p50"] < target["p50"], (name, target)
        assert target["gap"] > 0, (name, target)
    assert report["targets"]["floor"]["ttfb_p50"] > 0
    assert "gateway +ttfb_p50 ms" in report["ratios"]
    assert not any(key.startswith("gateway/") for key in report["ratios"])  # open loop


# --- load.py against a mock upstream started here ---------------------------------------


@pytest.fixture(scope="module")
def upstream_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m proxy.mock --port 0`` (streams: 8 chunks 5 ms apart); the URL is
    read from the line it prints once listening."""
    log = tmp_path_factory.mktemp("upstream") / "stderr.log"
    argv = [sys.executable, "-m", "proxy.mock", "--port", "0", "--interval", "0.005"]
    with log.open("wb") as stderr, subprocess.Popen(
            argv, cwd=REPO, env=bench_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=stderr) as proc:
        assert proc.stdout is not None
        try:
            deadline, line = time.monotonic() + 15, b""
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if proc.poll() is not None or left <= 0 or not select.select(
                        [proc.stdout], [], [], left)[0]:
                    pytest.fail(f"proxy.mock not listening: {log.read_text()}")
                line += proc.stdout.readline()
            url = line.decode().split("listening on ", 1)[1].strip()
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1"), line
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_load_counts_exactly_the_requested_requests(upstream_url: str) -> None:
    result = bench("load", "--url", f"{upstream_url}/chat/completions", "--requests", "300",
                   "--connections", "4", "--warmup", "0", "--timeout", "10", "--json",
                   timeout=30)
    assert result["requests"] == 300
    assert result["errors"] == {}
    assert result["rps"] > 0 and result["connections"] == 4
    assert 0 < result["latency_ms"]["p50"] <= result["latency_ms"]["max"]
    assert result["stream"] is False and result["ttfb_ms"] is None


def test_load_stream_reports_time_to_first_byte(upstream_url: str) -> None:
    result = bench("load", "--url", f"{upstream_url}/chat/completions", "--stream",
                   "--requests", "40", "--connections", "4", "--warmup", "0",
                   "--timeout", "10", "--json", timeout=30)
    assert result["requests"] == 40 and result["errors"] == {}
    assert result["stream"] is True
    ttfb, latency = result["ttfb_ms"], result["latency_ms"]
    # TTFB is the first body byte, not the whole answer (8 chunks 5 ms apart).
    assert ttfb is not None and 0 < ttfb["p50"] < latency["p50"]
    assert result["gap_ms"] is not None and result["gap_ms"] > 0


def test_load_reports_errors_not_rps_for_failures(upstream_url: str) -> None:
    result = bench("load", "--url", f"{upstream_url}/chat/completions", "--requests", "20",
                   "--connections", "2", "--warmup", "0", "--header", "X-Mock-Status:500",
                   "--json", timeout=30)
    assert result["requests"] == 20
    assert result["errors"] == {"status_500": 20}
    assert result["rps"] == 0


# --- bench/dedup.py: one upstream call for N identical requests ---------------------------


DEDUP_REQUESTS = 10


@pytest.fixture(scope="module")
def dedup_report() -> Any:
    report = bench("dedup", "--requests", str(DEDUP_REQUESTS), "--latency", "0.3", "--json",
                   timeout=50)
    assert report["requests"] == DEDUP_REQUESTS
    return report


def _all_ok(row: dict[str, Any]) -> None:
    assert row["requests"] == DEDUP_REQUESTS
    assert row["statuses"] == {"200": DEDUP_REQUESTS}, row


def test_dedup_one_upstream_call_with_dedup_n_without(dedup_report: Any) -> None:
    configs = dedup_report["configs"]
    expected = {"dedup", "no-dedup", "2 workers"} | ({"nginx + 2 workers"} if HAS_NGINX
                                                      else set())
    assert set(configs) == expected
    for row in configs.values():
        _all_ok(row)
    assert configs["dedup"]["upstream_calls"] == 1
    assert (configs["dedup"]["leader"], configs["dedup"]["follower"]) == (
        1, DEDUP_REQUESTS - 1)
    assert configs["no-dedup"]["upstream_calls"] == DEDUP_REQUESTS
    assert (configs["no-dedup"]["leader"], configs["no-dedup"]["follower"]) == (0, 0)
    two = configs["2 workers"]
    assert two["upstream_calls"] == 1
    assert set(two["per_worker"]) == {"worker-0", "worker-1"}


@needs_nginx
def test_dedup_through_shipped_nginx(dedup_report: Any) -> None:
    row = dedup_report["configs"]["nginx + 2 workers"]
    _all_ok(row)
    assert row["upstream_calls"] == 1
    assert sum(row["per_worker"].values()) == DEDUP_REQUESTS  # nginx named a worker each


# --- parallel_fetch.py -------------------------------------------------------------------


def test_parallel_fetch_parallel_beats_sequential() -> None:
    report = bench("parallel_fetch", "--providers", "3", "--delay", "0.2", "--json",
                   timeout=30)
    seconds = report["seconds"]
    assert report["providers"] == 3
    assert seconds["sequential"] >= 3 * 0.2
    assert seconds["parallel"] < seconds["sequential"]
    assert seconds["gateway"] > 0
    assert report["ratio"] == round(seconds["sequential"] / seconds["parallel"], 2)


# --- overload.py: the gateway sheds, the naive proxy passes on --------------------------


def test_overload_gateway_sheds_with_retry_after() -> None:
    report = bench("overload", "--rate", "400", "--duration", "0.5", "--timeout", "10",
                   "--json", timeout=50)
    offered = int(400 * 0.5)
    gateway, naive = report["targets"]["gateway"], report["targets"]["naive"]
    for row in (gateway, naive):
        assert row["offered"] == offered
        assert row["ok"] + row["shed"] + sum(row["other"].values()) == offered
        assert row["ok"] > 0 and row["upstream"]["calls"] > 0
    # 2.5x what the upstream can serve well: the gateway answers the excess with 503s.
    assert gateway["shed"] > 0 and gateway["shed_retry_after"] == gateway["shed"]
    assert gateway["upstream"]["max_in_flight"] <= report["limits"]["max"]
    assert "limiter" in gateway
    # The naive proxy passes everything on: no 503 of its own, and the upstream (which
    # serves at most 16 at once) has to reject more of it with 429/503.
    assert naive["shed"] == 0 and naive["upstream"]["calls"] == offered
    assert naive["upstream"]["rejected"] > gateway["upstream"]["rejected"]


# --- memory.py: every step, smallest counts ----------------------------------------------


def test_memory_reports_every_step() -> None:
    report = bench("memory", "--requests", "200", "--streams", "20", "--disconnects", "4",
                   "--json", timeout=50)
    steps = {row["step"]: row for row in report["steps"]}
    assert list(steps) == ["idle", "200 requests #1", "200 requests #2", "20 streams",
                           "4 disconnects"]
    for name, count in (("200 requests #1", 200), ("200 requests #2", 200),
                        ("20 streams", 20), ("4 disconnects", 4)):
        assert steps[name]["requests"] == count and steps[name]["errors"] == {}, steps[name]
        assert "growth_mb" in steps[name]
    for row in steps.values():
        assert row["rss_mb"] > 0 and row["fds"] == row["upstream_conns"] + row["other_fds"]
    assert len(report["targets"]) == 4
    assert report["targets"]["other fds back to idle after disconnects"] is True
