"""Real processes for the fault, load and secrets tests (issue #4, "Fault tests ...
against real processes on loopback"): the gateway as ``python -m proxy serve`` (on
uvloop, configured from a YAML file, as in production) and the mock upstream as
``python -m proxy.mock``, each on a free loopback port, waited for by bounded
polling and stopped in a ``finally`` through its own ``Popen`` (tests/test_workers.py's
``spawn``/``stop`` conventions). Plus the file-descriptor limit the load tests need.
"""

from __future__ import annotations

import asyncio
import dataclasses
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.test_workers import Spawned, clean_env, free_port, stop

READY_WITHIN = 20.0  # seconds a process may take to answer (a busy 2-core machine)


@dataclasses.dataclass
class Proc:
    """A started process, its base URL and port."""

    spawned: Spawned
    url: str
    port: int

    @property
    def pid(self) -> int:
        return self.spawned.process.pid

    def output(self) -> str:
        return self.spawned.output()


def spawn_with_env(name: str, argv: list[str], tmp_path: Path,
                   env: dict[str, str] | None = None) -> Spawned:
    """``tests.test_workers.spawn`` plus variables (a provider's ``api_key_env``)."""
    log = tmp_path / f"{name}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(argv, env={**clean_env(), **(env or {})}, cwd=tmp_path,
                                   stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT)
    return Spawned(name, process, log)


async def wait_answering(url: str, spawned: Spawned, within: float = READY_WITHIN) -> None:
    """GET ``url`` until it answers 200, bounded; fails at once if the process exits."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if spawned.process.poll() is not None:
                pytest.fail(f"{spawned.name} exited with {spawned.process.returncode}\n"
                            + spawned.output())
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{url} not answering within {within} s\n" + spawned.output())
            await asyncio.sleep(0.05)


@asynccontextmanager
async def started(name: str, argv: list[str], port: int, ready_path: str, tmp_path: Path,
                  env: dict[str, str] | None = None) -> AsyncIterator[Proc]:
    spawned = spawn_with_env(name, argv, tmp_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_answering(url + ready_path, spawned)
        yield Proc(spawned, url, port)
    finally:
        await stop(spawned)


@asynccontextmanager
async def gateway_process(tmp_path: Path, config: dict[str, Any], *,
                          env: dict[str, str] | None = None, log_level: str = "INFO",
                          name: str = "gateway") -> AsyncIterator[Proc]:
    """One gateway worker serving ``config`` (written to ``<name>.yaml``); its output,
    logging included, goes to ``<name>.log``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(path),
            "--port", str(port), "--log-level", log_level]
    async with started(name, argv, port, "/healthz", tmp_path, env) as proc:
        yield proc


@asynccontextmanager
async def mock_upstream_process(tmp_path: Path) -> AsyncIterator[Proc]:
    """``python -m proxy.mock`` (instant answers, uvloop) in its own process, so a load test's
    upstream does not share the client's core; ``url`` ends in ``/v1``."""
    port = free_port()
    argv = [sys.executable, "-m", "proxy.mock", "--port", str(port)]
    async with started("upstream", argv, port, "/v1/models", tmp_path) as proc:
        proc.url += "/v1"
        yield proc


@contextmanager
def nofile_raised(needed: int) -> Iterator[int]:
    """The soft RLIMIT_NOFILE raised to the hard limit for the test process and so for
    the processes it starts (they inherit it); restored afterwards. Skips when the hard
    limit is under ``needed``. Yields the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, needed) if hard == resource.RLIM_INFINITY else hard
    if target < needed:
        pytest.skip(f"needs {needed} file descriptors; the hard RLIMIT_NOFILE is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield target
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def soft_nofile(pid: int) -> int:
    """The soft "Max open files" of a running process, from ``/proc/PID/limits``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise RuntimeError(f"no open-files limit for pid {pid}")
