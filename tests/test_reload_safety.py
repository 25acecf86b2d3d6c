"""SIGHUP must never open the gateway or drop its providers by accident (issue 9,
part 3): with the implicit ``./proxy.yaml`` (no ``--config``), a reload after the file
was deleted or emptied used to fall back to the defaults (no providers, every request
404, and no gateway keys: open to anyone, on the operator's upstream key). Now such a
reload is refused like an invalid file, and a file that drops every key is refused
unless it says ``auth: {keys: []}``. Real gateway processes, alone and with two
workers."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.conftest import StartUpstream
from tests.procs import Spawned, free_port, poll_healthz, spawn_proxy, stop
from tests.reload_helpers import OLD_KEY, ask, config_text, named_upstream, until_answered

REFUSED = "reload refused, the running config stays in force"


def without_auth(upstreams: dict[str, str], keys: object = "absent") -> str:
    """The running file with ``auth`` left out, or with ``auth.keys`` set to ``keys``."""
    raw = yaml.safe_load(config_text(upstreams, "a", OLD_KEY))
    del raw["auth"]
    if keys != "absent":
        raw["auth"] = {"keys": keys}
    return yaml.safe_dump(raw)


# Each change returns whatever ``unlink``/``write_text`` does: the value is not used.
CHANGES: dict[str, Callable[[Path, dict[str, str]], object]] = {
    "deleted": lambda path, _: path.unlink(),
    "emptied": lambda path, _: path.write_text(""),
    "blank": lambda path, _: path.write_text("# being rewritten\n\n"),
    "auth dropped": lambda path, ups: path.write_text(without_auth(ups)),
    "keys: null": lambda path, ups: path.write_text(without_auth(ups, None)),
}


async def implicit_gateway(start_upstream: StartUpstream, tmp_path: Path, *args: str
                           ) -> tuple[Spawned, str, dict[str, str]]:
    """A gateway started in ``tmp_path`` with no ``--config``: it finds ./proxy.yaml."""
    upstreams = {name: await start_upstream(named_upstream(name)) for name in ("a", "b")}
    (tmp_path / "proxy.yaml").write_text(config_text(upstreams, "a", OLD_KEY))
    port = free_port()
    return spawn_proxy(["--port", str(port), *args], tmp_path), f"http://127.0.0.1:{port}", \
        upstreams


async def until_logged(proxy: Spawned, text: str, count: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while proxy.log.read_text().count(text) < count:
        assert time.monotonic() < deadline, proxy.output()
        await asyncio.sleep(0.05)


async def still_serving_the_old_config(session: aiohttp.ClientSession, base: str,
                                       times: int = 1) -> None:
    for _ in range(times):
        assert await ask(session, base, OLD_KEY) == (200, "a")
        assert await ask(session, base, "sk-not-a-key") == (401, "invalid_api_key")


@pytest.mark.parametrize("change", CHANGES)
async def test_a_reload_that_would_fall_back_or_open_the_gateway_is_refused(
    start_upstream: StartUpstream, tmp_path: Path, change: str,
) -> None:
    proxy, base, upstreams = await implicit_gateway(start_upstream, tmp_path)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            await poll_healthz(session, f"{base}/healthz", bool, [proxy])
            await still_serving_the_old_config(session, base)
            CHANGES[change](tmp_path / "proxy.yaml", upstreams)
            proxy.process.send_signal(signal.SIGHUP)
            await until_logged(proxy, REFUSED, 1)
            await still_serving_the_old_config(session, base, times=3)
        assert "reload: config from" not in proxy.log.read_text()
    finally:
        assert await stop(proxy) == 0, proxy.output()


async def test_keys_written_as_an_empty_list_open_the_gateway_on_purpose(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    proxy, base, upstreams = await implicit_gateway(start_upstream, tmp_path)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            await poll_healthz(session, f"{base}/healthz", bool, [proxy])
            (tmp_path / "proxy.yaml").write_text(without_auth(upstreams, []))
            proxy.process.send_signal(signal.SIGHUP)
            await until_answered(session, base, "sk-anyone", (200, "a"), proxy)
        assert "no gateway keys configured any more (auth.keys: [])" in proxy.log.read_text()
    finally:
        assert await stop(proxy) == 0, proxy.output()


async def test_two_workers_both_refuse_a_reload_of_a_deleted_file(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    proxy, base, upstreams = await implicit_gateway(start_upstream, tmp_path,
                                                    "--workers", "2")
    try:
        connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=20)) as session:
            await poll_healthz(session, f"{base}/healthz", lambda s: len(s) == 2, [proxy])
            (tmp_path / "proxy.yaml").unlink()
            proxy.process.send_signal(signal.SIGHUP)
            await until_logged(proxy, REFUSED, 2)
            await still_serving_the_old_config(session, base, times=10)
            (tmp_path / "proxy.yaml").write_text(without_auth(upstreams, []))
            proxy.process.send_signal(signal.SIGHUP)
            await until_logged(proxy, "reload: config from", 2)
            for _ in range(10):
                assert await ask(session, base, "sk-anyone") == (200, "a")
    finally:
        assert await stop(proxy) == 0, proxy.output()


async def test_a_worker_restarted_after_the_file_was_deleted_never_opens_the_gateway(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    """The supervisor restarts a dead worker with the start-up command line: it must read
    the file found at start-up (pinned), not fall back to the defaults when it is gone.
    A worker that cannot read it exits with the config-error status, which stops the
    gateway: loud, rather than a worker open to anyone on the operator's upstream key."""
    proxy, base, _ = await implicit_gateway(start_upstream, tmp_path, "--workers", "2")
    try:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=5)) as session:
            seen = await poll_healthz(session, f"{base}/healthz", lambda s: len(s) == 2,
                                      [proxy])
            (tmp_path / "proxy.yaml").unlink()
            os.kill(next(pid for pid, index in seen.items() if index == 0), signal.SIGKILL)
            deadline = time.monotonic() + 15
            while proxy.process.poll() is None and time.monotonic() < deadline:
                try:
                    status, _ = await ask(session, base, "sk-anyone")
                    assert status != 200, proxy.output()
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.05)
        assert await asyncio.to_thread(proxy.process.wait, 10) == 2, proxy.output()
        assert "cannot read config file" in proxy.output()
    finally:
        await stop(proxy)
