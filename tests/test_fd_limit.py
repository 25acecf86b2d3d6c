"""A worker raises its open-files soft limit to what its connection limits need (the
hard limit at most, with a warning then): with the common default of 1024 the kernel
would refuse clients long before ``server.max_connections`` applies."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import MockUpstream
from tests.procs import free_port, poll_healthz, spawn, stop


def open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line")


@pytest.mark.parametrize(("ulimits", "expected_soft", "warns"), [
    ("ulimit -Sn 256", 4096 + 1024 + 64, False),  # the defaults' needs, under the hard limit
    ("ulimit -Sn 256 && ulimit -Hn 2000", 2000, True),  # capped by the hard limit: say so
])
async def test_the_soft_limit_is_raised_to_what_the_limits_need(
    mock_upstream: MockUpstream, tmp_path: Path, ulimits: str, expected_soft: int,
    warns: bool,
) -> None:
    if open_files_limits(os.getpid())[1] < 5184:
        pytest.skip("this machine's hard limit on open files is below 5184")
    port = free_port()
    serve = shlex.join([sys.executable, "-m", "proxy", "serve", "--port", str(port),
                        "--upstream", mock_upstream.url])
    proxy = spawn("proxy", ["bash", "-c", f"{ulimits} && exec {serve}"], tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            await poll_healthz(session, f"http://127.0.0.1:{port}/healthz", bool, [proxy])
        assert open_files_limits(proxy.process.pid)[0] == expected_soft
        assert ("open files limited to 2000" in proxy.log.read_text()) is warns
    finally:
        assert await stop(proxy) == 0, proxy.output()
