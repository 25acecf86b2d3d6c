"""``proxy serve --workers N``: real supervisor and worker processes on loopback.

Issue #3, "Workers behind nginx": N worker processes on one port (SO_REUSEPORT) or one
unix socket each, supervised: a worker that dies is restarted; SIGTERM stops them all.
The helpers here are shared with ``test_nginx.py``. Every process a test starts is
stopped through its ``Popen`` object in a ``finally``; its output goes to a file in
``tmp_path`` and is shown when the test fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from proxy.config.loader import ConfigError, Overrides, load_config
from proxy.config.worker import WorkerSpec
from proxy.mock.payloads import GREETING
from proxy.providers import PROVIDER_TYPES
from proxy.server.serve import CannotListen, running
from proxy.server.supervisor import Backoff, Supervisor
from tests.conftest import MakeConfig, MockUpstream

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
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


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="proxy-sock-") as path:
        yield Path(path)


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


async def test_two_workers_share_a_port_are_restarted_and_stop_cleanly(
    mock_upstream: MockUpstream, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proxy = spawn_proxy(["--workers", "2", "--port", str(port), "--upstream",
                         mock_upstream.url], tmp_path)
    try:
        async with fresh_connections() as session:
            first = await poll_healthz(session, f"{url}/healthz", lambda s: len(s) == 2,
                                       [proxy])
            assert sorted(first.values()) == [0, 1]

            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test",
                                          max_retries=0, timeout=10) as client:
                for _ in range(4):  # new connections: both workers answer some
                    chat = await client.chat.completions.create(model="m", messages=HELLO)
                    assert (chat.choices[0].message.content or "").startswith(GREETING)

            victim = next(pid for pid, index in first.items() if index == 0)
            os.kill(victim, signal.SIGKILL)
            later = await poll_healthz(
                session, f"{url}/healthz",
                lambda s: any(i == 0 and pid not in first for pid, i in s.items()), [proxy])
        assert not alive(victim)
        assert "worker 0" in proxy.log.read_text() and "killed by SIGKILL" in (
            proxy.log.read_text()), proxy.output()

        assert await stop(proxy) == 0, proxy.output()
        workers = set(first) | set(later)
        assert not [pid for pid in workers if alive(pid)], proxy.output()
    finally:
        await stop(proxy)


async def test_each_worker_answers_on_its_own_unix_socket(
    mock_upstream: MockUpstream, tmp_path: Path, socket_dir: Path
) -> None:
    proxy = spawn_proxy(["--workers", "2", "--socket-dir", str(socket_dir), "--port",
                         str(free_port()), "--upstream", mock_upstream.url], tmp_path)
    spec = WorkerSpec(index=0, count=2, socket_dir=socket_dir)
    try:
        answers = await wait_for_sockets(list(spec.peers), [proxy])
        assert [a["worker"] for a in answers] == [0, 1]
        assert len({a["pid"] for a in answers}) == 2
        for path in spec.peers:
            assert stat.S_IMODE(path.stat().st_mode) == 0o666  # server.socket_mode
        assert await stop(proxy) == 0, proxy.output()
        assert not any(path.exists() for path in spec.peers), "sockets left behind"
    finally:
        await stop(proxy)


def test_port_0_with_several_workers_is_a_config_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--workers", "2", "--port", "0",
         "--upstream", "http://127.0.0.1:9/v1"],
        env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 2, result.stderr
    assert "config error: server.port: must be a fixed port" in result.stderr


async def test_a_stale_socket_is_replaced_and_a_live_one_is_refused(
    mock_upstream: MockUpstream, make_config: MakeConfig, socket_dir: Path
) -> None:
    config = make_config([{"name": "u", "type": "openai_compat", "base_url": mock_upstream.url}],
                         server={"port": 0, "socket_dir": str(socket_dir)})
    worker = WorkerSpec.of(config)
    path = worker.socket_path(0)
    with socket.socket(socket.AF_UNIX) as left_behind:  # as after a SIGKILL: bound, closed
        left_behind.bind(str(path))
    async with running(config, worker):
        assert await unix_healthz(path) == {"status": "ok", "worker": 0, "pid": os.getpid()}
        with pytest.raises(CannotListen, match="another process listens on it"):
            async with running(config, worker):
                pass
        assert (await unix_healthz(path))["worker"] == 0  # the live one is untouched
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(CannotListen, match="not a socket"):
        async with running(config, worker):
            pass
    assert path.read_text() == "not a socket"


def test_server_settings_from_file_env_and_flags(tmp_path: Path) -> None:
    def load(env: dict[str, str], flags: Overrides | None = None) -> tuple[int, str | None]:
        config = load_config(flags or Overrides(), env, PROVIDER_TYPES.keys())
        return config.server.workers, config.server.socket_dir

    assert load({}) == (1, None)
    assert load({"PROXY_WORKERS": "4", "PROXY_SOCKET_DIR": "/run/p"}) == (4, "/run/p")
    assert load({"PROXY_WORKERS": "4"}, Overrides(workers=2, socket_dir="/s")) == (2, "/s")
    with pytest.raises(ConfigError) as error:
        load({"PROXY_WORKERS": "0", "PROXY_SOCKET_DIR": ""})
    assert error.value.problems == ["server.workers: must be greater than 0 (got 0)",
                                    "server.socket_dir: must be a non-empty string"]


def test_worker_spec_names_every_peer_socket() -> None:
    spec = WorkerSpec(index=1, count=3, socket_dir=Path("/run/proxy"))
    assert spec.socket_path(2) == Path("/run/proxy/worker-2.sock")
    assert spec.peers == tuple(Path(f"/run/proxy/worker-{i}.sock") for i in range(3))
    assert WorkerSpec(index=0, count=2).peers == ()
    with pytest.raises(ValueError, match="TCP only"):
        WorkerSpec().socket_path(0)


def test_restart_backoff_doubles_then_resets_after_a_long_life() -> None:
    backoff = Backoff()
    assert [backoff.next_delay(1.0) for _ in range(7)] == [0.5, 1, 2, 4, 8, 10, 10]
    assert backoff.next_delay(31.0) == 0.5
    assert backoff.next_delay(0.1) == 1.0


def test_a_worker_with_a_config_error_stops_the_supervisor() -> None:
    """Exit status 2 will not heal by restarting: the supervisor gives up with 2."""
    def command(index: int) -> list[str]:
        return [sys.executable, "-c", f"raise SystemExit({2 if index else 0})"]

    started = time.monotonic()
    assert Supervisor(command, 2).run() == 2
    assert time.monotonic() - started < 5


async def test_socket_mode_is_set_from_an_octal_string(
    mock_upstream: MockUpstream, make_config: MakeConfig, socket_dir: Path
) -> None:
    config = make_config([{"name": "u", "type": "openai_compat", "base_url": mock_upstream.url}],
                         server={"port": 0, "socket_dir": str(socket_dir),
                                 "socket_mode": "0640"})
    worker = WorkerSpec.of(config)
    async with running(config, worker):
        assert stat.S_IMODE(worker.socket_path(0).stat().st_mode) == 0o640
    for bad in (660, "0999", "66", "01777"):
        with pytest.raises(ConfigError) as error:
            make_config([], server={"socket_mode": bad})
        assert error.value.problems == [
            'server.socket_mode: must be an octal string such as "0660"'], bad
