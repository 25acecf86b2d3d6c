"""A real ``redis-server`` for the Redis backend's tests (the ``redis_server`` fixture in
conftest.py): on a free loopback port, no persistence, its files in the test's tmp_path.
It can be killed (an outage) and started again on the same port (the recovery); it is
only ever stopped by its own PID. Plus ``gateway_processes``: separate ``python -m proxy
serve`` processes on one config, the way several hosts share one Redis."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.procs import Spawned, free_port, fresh_connections, poll_healthz, spawn_proxy, stop


def find_redis_server() -> str | None:
    return shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/sbin/redis-server") if Path(p).is_file()),
        None)


class RedisServer:
    def __init__(self, binary: str, directory: Path, password: str | None = None):
        self._binary = binary
        self._directory = directory
        self.password = password
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log = directory / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, within: float = 10.0) -> None:
        """Start it and wait (bounded) until it answers PING."""
        argv = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self._directory),
                "--enable-debug-command", "local"]  # DEBUG SLEEP: a slow Redis
        if self.password:
            argv += ["--requirepass", self.password]
        with self._log.open("ab") as output:
            self._process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + within
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"redis-server did not start:\n{self._log.read_text()}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        """A PING answered at all (``+PONG``, or ``-NOAUTH`` with a password set)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64)[:1] in (b"+", b"-")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL by PID, as a crash would; its port is free again afterwards."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
        if process is not None:
            process.wait(10)


@asynccontextmanager
async def gateway_processes(config: dict[str, Any], tmp_path: Path, count: int = 2
                            ) -> AsyncIterator[tuple[list[str], list[Spawned]]]:
    """``count`` gateway processes serving ``config`` (the YAML file's structure), each on
    its own port; yields their base URLs once all answer, and the processes (whose
    ``log`` is their output). All are stopped by PID on exit."""
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    spawned: list[Spawned] = []
    urls: list[str] = []
    try:
        for index in range(count):
            port = free_port()
            spawned.append(spawn_proxy(["--config", str(path), "--port", str(port)],
                                       tmp_path, name=f"gateway-{index}"))
            urls.append(f"http://127.0.0.1:{port}")
        async with fresh_connections() as session:
            for url in urls:
                await poll_healthz(session, f"{url}/healthz", lambda seen: len(seen) > 0,
                                   spawned, within=30)
        yield urls, spawned
    finally:
        for process in spawned:
            await stop(process)
