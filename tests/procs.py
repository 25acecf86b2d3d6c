"""Real processes on loopback, for every test that starts ``python -m proxy ...``.

* ``free_port``, ``clean_env`` (no provider or server settings from the caller), and
  ``spawn``/``spawn_proxy``/``stop``: a child whose output goes to a file in
  ``tmp_path`` (``Spawned.output()`` shows it when a test fails), stopped through its own
  ``Popen`` (SIGTERM, then SIGKILL), never by name;
* ``poll_healthz``/``wait_for_sockets``: bounded polling of ``/healthz`` over TCP or each
  worker's unix socket, failing early if a watched process exits;
* the fault, load and secrets tests' processes (issue #4, "Fault tests ... against real
  processes on loopback"): the gateway as ``python -m proxy serve`` (on uvloop,
  configured from a YAML file, as in production) and the mock upstream as ``python -m
  proxy.mock``, each on a free port; plus the file-descriptor limit the load tests need.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

READY_WITHIN = 20.0  # seconds a process may take to answer (a busy 2-core machine)
# Variables that would configure providers or the server behind the test's back.
_CONFIG_VARIABLES = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENROUTER_API_KEY", "OLLAMA_HOST")
Seen = dict[int, int]  # worker pid -> worker index, as /healthz reported them


@dataclasses.dataclass
class Spawned:
    """A process this test started, and the file its output goes to."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return f"--- {self.name} output:\n{self.log.read_text(errors='replace')}"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in _CONFIG_VARIABLES and not k.startswith("PROXY_")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(name: str, argv: list[str], tmp_path: Path) -> Spawned:
    log = tmp_path / f"{name}.log"
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(argv, env=clean_env(), cwd=tmp_path, stdout=output,
                                   stderr=subprocess.STDOUT)
    return Spawned(name, process, log)


def spawn_proxy(args: list[str], tmp_path: Path, name: str = "proxy") -> Spawned:
    return spawn(name, [sys.executable, "-m", "proxy", "serve", *args], tmp_path)


async def stop(spawned: Spawned, within: float = 10.0) -> int | None:
    """SIGTERM and wait (in a thread: the test's loop may be serving the upstream);
    SIGKILL if it has not exited ``within`` seconds. Returns the exit code."""
    process = spawned.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(process.wait, within)
    except subprocess.TimeoutExpired:
        process.kill()
        await asyncio.to_thread(process.wait, 5)
        return None


async def poll_healthz(session: aiohttp.ClientSession, url: str, done: Callable[[Seen], bool],
                       watched: list[Spawned], within: float = 10.0) -> Seen:
    """GET ``url`` until ``done(seen)``, bounded; fails early if a watched process exits."""
    seen: Seen = {}
    deadline = time.monotonic() + within
    while not done(seen):
        for spawned in watched:
            if spawned.process.poll() is not None:
                pytest.fail(f"{spawned.name} exited with {spawned.process.returncode}\n"
                            + "\n".join(s.output() for s in watched))
        if time.monotonic() > deadline:
            pytest.fail(f"{url}: condition not met within {within} s; saw {seen}\n"
                        + "\n".join(s.output() for s in watched))
        try:
            async with session.get(url) as response:
                body = await response.json()
                seen[body["pid"]] = body["worker"]
        except (aiohttp.ClientError, TimeoutError):
            await asyncio.sleep(0.05)
    return seen


@asynccontextmanager
async def fresh_connections() -> AsyncIterator[aiohttp.ClientSession]:
    """A new TCP connection per request: SO_REUSEPORT spreads connections, not requests."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=2)) as session:
        yield session


async def unix_healthz(path: Path) -> dict[str, object]:
    connector = aiohttp.UnixConnector(path=str(path))
    async with (aiohttp.ClientSession(connector=connector,
                                      timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get("http://worker/healthz") as response):
        assert response.status == 200
        body: dict[str, object] = await response.json()
        return body


async def wait_for_sockets(paths: list[Path], watched: list[Spawned],
                           within: float = 10.0) -> list[dict[str, object]]:
    """Each unix socket's /healthz answer, once all answer (bounded)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return [await unix_healthz(path) for path in paths]
        except (aiohttp.ClientError, OSError):
            if time.monotonic() > deadline or any(s.process.poll() is not None
                                                  for s in watched):
                pytest.fail("worker sockets not answering\n"
                            + "\n".join(s.output() for s in watched))
            await asyncio.sleep(0.05)


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
    """``spawn`` plus variables (a provider's ``api_key_env``)."""
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
