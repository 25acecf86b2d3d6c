"""An address the gateway cannot listen on: one clear line and a prompt exit, status 3.

Issue 9, part 3: "``--workers N`` on a port already in use crash-loops forever (hundreds
of log lines, tracebacks) instead of exiting with one clear line; a single worker on a
busy port or a bad ``--host`` prints a Python traceback. Two separate ``--workers``
gateways silently share one port through SO_REUSEPORT." Real processes; every run is
bounded by ``subprocess.run``'s timeout.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.procs import clean_env, free_port, poll_healthz, spawn_proxy, stop

EXIT_CANNOT_LISTEN = 3
NO_UPSTREAM = "http://127.0.0.1:9/v1"  # never called: the gateway does not get that far
# A documentation address (RFC 5737): a numeric host, so no DNS query leaves the machine,
# and never one of this host's, so binding it fails at once.
NOT_OURS = "192.0.2.1"


def serve(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--upstream", NO_UPSTREAM, *args],
        env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=30,
        check=False)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], where: str,
                          reason: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == EXIT_CANNOT_LISTEN, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if "cannot listen" in line]
    assert len(lines) == 1, output
    assert f"cannot listen on {where}: {reason}" in lines[0], output
    assert len(output.splitlines()) < 10, output  # not a crash loop


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_port_exits_with_one_line(tmp_path: Path, workers: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = serve(["--workers", workers, "--port", str(port)], tmp_path)
    assert_one_clear_line(result, f"127.0.0.1:{port}", "address already in use")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_host_that_is_not_this_machines_exits_with_one_line(tmp_path: Path,
                                                              workers: str) -> None:
    port = free_port()
    result = serve(["--workers", workers, "--host", NOT_OURS, "--port", str(port)], tmp_path)
    assert_one_clear_line(result, f"{NOT_OURS}:{port}", "Cannot assign requested address")


async def test_a_second_multi_worker_gateway_refuses_the_port_of_the_first(
    tmp_path: Path
) -> None:
    port = free_port()
    first = spawn_proxy(["--workers", "2", "--port", str(port), "--upstream", NO_UPSTREAM],
                        tmp_path, name="first")
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=2)) as session:
            before = await poll_healthz(session, url, lambda s: len(s) == 2, [first])
            result = serve(["--workers", "2", "--port", str(port)], tmp_path)
            assert_one_clear_line(result, f"127.0.0.1:{port}", "address already in use")
            # Only the first gateway's workers answer on the port (new connections).
            after = set()
            for _ in range(20):
                async with session.get(url) as response:
                    after.add((await response.json())["pid"])
        assert after <= set(before), (before, after)
    finally:
        await stop(first)
