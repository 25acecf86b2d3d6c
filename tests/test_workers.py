"""``proxy serve --workers N``: real supervisor and worker processes on loopback.

Issue #3, "Workers behind nginx": N worker processes on one port (SO_REUSEPORT) or one
unix socket each, supervised: a worker that dies is restarted; SIGTERM stops them all.
The helpers are in tests/procs.py. Every process a test starts is
stopped through its ``Popen`` object in a ``finally``; its output goes to a file in
``tmp_path`` and is shown when the test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

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
from tests.procs import (
    clean_env,
    free_port,
    fresh_connections,
    poll_healthz,
    spawn_proxy,
    stop,
    unix_healthz,
    wait_for_sockets,
)

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
