"""SIGHUP reloads the config file (issue #4, "Graceful lifecycle"): providers, keys and
routing change without dropping in-flight requests, and a broken file is refused with
its reasons logged while the running config keeps serving. The gateway runs as a real
process (``python -m proxy serve``), alone and with two workers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from proxy.app import build_app
from proxy.config.keys import hash_secret
from proxy.config.loader import ConfigError
from proxy.server.serve import running
from proxy.server.supervisor import Supervisor
from proxy.state import LIVE
from tests.conftest import MakeConfig, StartFake, StartUpstream
from tests.fake_upstream import MODELS, Reply, Seen, replaced
from tests.polling import until
from tests.procs import Spawned, clean_env, free_port, poll_healthz, spawn_proxy, stop
from tests.reload_helpers import (
    CHAT,
    NEW_KEY,
    OLD_KEY,
    ask,
    config_text,
    named_upstream,
    until_answered,
)


async def stream_events(session: aiohttp.ClientSession, base: str, started: asyncio.Event
                        ) -> bytes:
    body = {"model": "m", "stream": True, "messages": []}
    received = b""
    async with session.post(base + CHAT, json=body,
                            headers={"Authorization": f"Bearer {OLD_KEY}"}) as response:
        async for chunk in response.content.iter_any():
            received += chunk
            started.set()
    return received


async def refused(base: str) -> bool:
    """Whether ``base`` refuses a connection: a stopping gateway closes its listener
    first, then drains the streams it has for up to ``shutdown_grace``."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", URL(base).port)
    except OSError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def start(start_upstream: StartUpstream, tmp_path: Path, *args: str
                ) -> tuple[Spawned, str, Path, dict[str, str]]:
    upstreams = {name: await start_upstream(named_upstream(name)) for name in ("a", "b")}
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text(upstreams, "a", OLD_KEY))
    port = free_port()
    proxy = spawn_proxy(["--config", str(path), "--port", str(port), *args], tmp_path)
    return proxy, f"http://127.0.0.1:{port}", path, upstreams


async def test_sighup_switches_providers_and_keys_while_a_stream_finishes(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    proxy, base, path, upstreams = await start(start_upstream, tmp_path)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            await poll_healthz(session, f"{base}/healthz", bool, [proxy])
            assert await ask(session, base, OLD_KEY) == (200, "a")
            started = asyncio.Event()
            stream = asyncio.create_task(stream_events(session, base, started))
            await asyncio.wait_for(started.wait(), 5)
            path.write_text(config_text(upstreams, "b", NEW_KEY))
            proxy.process.send_signal(signal.SIGHUP)
            await until_answered(session, base, NEW_KEY, (200, "b"), proxy)
            assert await ask(session, base, OLD_KEY) == (401, "invalid_api_key")
            received = await asyncio.wait_for(stream, 10)
        assert received.count(b'"by":"a"') == 20 and received.endswith(b"data: [DONE]\n\n")
        assert proxy.process.poll() is None
        assert "reload: config from" in proxy.log.read_text()
    finally:
        assert await stop(proxy) == 0, proxy.output()


@pytest.mark.parametrize(("broken", "reason"), [
    ("providers: [", "invalid YAML"),
    ("providers: []\nretries: {max_attempts: 0}\n", "retries.max_attempts: must be"),
    ("providers: []\nsurprise: 1\n", "surprise: unknown key"),
])
async def test_sighup_with_a_broken_file_keeps_the_running_config(
    start_upstream: StartUpstream, tmp_path: Path, broken: str, reason: str,
) -> None:
    proxy, base, path, _ = await start(start_upstream, tmp_path)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            await poll_healthz(session, f"{base}/healthz", bool, [proxy])
            path.write_text(broken)
            proxy.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "reload refused" not in proxy.log.read_text():
                assert time.monotonic() < deadline, proxy.output()
                await asyncio.sleep(0.05)
            assert await ask(session, base, OLD_KEY) == (200, "a")
        log = proxy.log.read_text()
        assert reason in log and "the running config stays in force" in log
    finally:
        assert await stop(proxy) == 0, proxy.output()


async def test_sighup_to_the_supervisor_reloads_every_worker(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    proxy, base, path, upstreams = await start(start_upstream, tmp_path, "--workers", "2")
    try:
        connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
        async with aiohttp.ClientSession(connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=20)) as session:
            await poll_healthz(session, f"{base}/healthz", lambda s: len(s) == 2, [proxy])
            path.write_text(config_text(upstreams, "b", NEW_KEY))
            proxy.process.send_signal(signal.SIGHUP)
            await until_answered(session, base, NEW_KEY, (200, "b"), proxy)
            deadline = time.monotonic() + 10
            workers_seen: set[int] = set()
            while len(workers_seen) < 2:  # both workers answer with the new config
                assert time.monotonic() < deadline, proxy.output()
                async with session.get(f"{base}/healthz") as response:
                    worker = (await response.json())["worker"]
                if await ask(session, base, NEW_KEY) == (200, "b"):
                    workers_seen.add(worker)
            for _ in range(20):
                assert await ask(session, base, NEW_KEY) == (200, "b")
        assert proxy.output().count("reload: config from") == 2
    finally:
        assert await stop(proxy) == 0, proxy.output()


async def test_reload_keeps_the_state_of_unchanged_providers(make_config: MakeConfig) -> None:
    """A provider whose entry and settings did not change keeps its breaker, limiter and
    retry budget: a reload must not forget an upstream that keeps failing."""
    a = {"name": "a", "type": "openai_compat", "base_url": "http://127.0.0.1:9/v1"}
    b = {"name": "b", "type": "openai_compat", "base_url": "http://127.0.0.1:10/v1"}
    live = build_app(make_config([a, b]))[LIVE]
    before = live.gateway.dispatcher
    live.reload(make_config([a, {**b, "base_url": "http://127.0.0.1:11/v1"}],
                            aliases={"x": "a/y"}))
    after = live.gateway.dispatcher
    assert after.breakers["a"] is before.breakers["a"]
    assert after.limiters["a"] is before.limiters["a"]
    assert after.retries["a"] is before.retries["a"]
    assert after.breakers["b"] is not before.breakers["b"]  # a new upstream, a new state
    live.reload(make_config([a], breaker={"cooldown": 9}))
    assert live.gateway.dispatcher.breakers["a"] is not before.breakers["a"]
    # b was removed: its adaptive limit no longer caps connections on any origin.
    assert "b" not in live.shared.client._pool._cap_owners
    assert live.gateway.dispatcher.limiters["a"] is before.limiters["a"]
    assert live.reloads == 2


async def test_sections_that_need_a_restart_keep_their_running_values(
    make_config: MakeConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    a = {"name": "a", "type": "openai_compat", "base_url": "http://127.0.0.1:9/v1"}
    live = build_app(make_config([a]))[LIVE]
    gateway = live.reload(make_config([a], server={"port": 9999}, pool={"limit": 3},
                                      timeouts={"read": 1}))
    assert gateway.config.server.port != 9999 and gateway.config.pool.limit != 3
    assert gateway.config.timeouts.read != 1
    assert "only a restart applies them: server, pool, timeouts" in caplog.text


async def test_a_reloaded_provider_runs_under_its_own_deadlines(
    make_config: MakeConfig, start_fake: StartFake,
) -> None:
    """Per-provider ``timeouts`` are part of the provider entry, so a reload applies
    them (only the global ``timeouts`` section needs a restart)."""
    entry = (await start_fake(latency=30)).provider("slow")  # hangs
    config = make_config([entry], server={"port": 0}, cache={"enabled": False})
    gateway_app = build_app(config)
    async with running(config, app=gateway_app) as base:
        gateway_app[LIVE].reload(make_config([{**entry, "timeouts": {"headers": 0.3}}],
                                             cache={"enabled": False}))
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.post(base + CHAT, json={"model": "m", "messages": []}) as r:
                body = await r.json()
            waited = time.monotonic() - started
    assert (r.status, body["error"]["code"]) == (504, "upstream_headers_timeout")
    assert waited < 5


async def test_a_reloaded_alias_does_not_replay_the_old_targets_cached_answer(
    make_config: MakeConfig, start_fake: StartFake,
) -> None:
    upstream = await start_fake()

    async def naming(request: web.Request, seen: Seen) -> Reply | None:
        """Its answer says the model it was asked for."""
        return replaced(upstream.chat, pieces=((seen.json() or {}).get("model", ""),))

    upstream.hook = naming
    entry = upstream.provider(discover=True)
    config = make_config([entry], server={"port": 0}, aliases={"fast": "up/gpt-a"})
    gateway_app = build_app(config)
    body = {"model": "fast", "temperature": 0, "messages": []}
    async with running(config, app=gateway_app) as base, aiohttp.ClientSession() as session:
        async with session.post(base + CHAT, json=body) as first:
            assert first.headers["X-Cache"] == "MISS"
        gateway_app[LIVE].reload(make_config([entry], aliases={"fast": "up/gpt-b"}))
        async with session.post(base + CHAT, json=body) as second:
            answer = await second.json()
    assert answer["choices"][0]["message"]["content"] == "gpt-b"
    assert [body["model"] for body in upstream.bodies()] == ["gpt-a", "gpt-b"]


def spawn_as_the_supervisor_does(argv: list[str], log: Path) -> Spawned:
    """With SIGHUP blocked across the exec (``Supervisor._start``)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        with log.open("wb") as output:
            process = subprocess.Popen(argv, env=clean_env(), cwd=log.parent,
                                       stdout=output, stderr=subprocess.STDOUT)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return Spawned(log.stem, process, log)


async def test_a_sighup_during_start_up_is_held_not_fatal(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    """A worker the supervisor just (re)started gets SIGHUP blocked across the exec, and
    ``proxy serve`` keeps it blocked until its reload handler is in place: a reload
    forwarded at that moment is done late instead of killing the worker."""
    upstreams = {name: await start_upstream(named_upstream(name)) for name in ("a", "b")}
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text(upstreams, "b", NEW_KEY))
    port = free_port()
    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", str(port)]
    spawned = spawn_as_the_supervisor_does(argv, tmp_path / "early.log")
    process, log = spawned.process, spawned.log
    try:
        process.send_signal(signal.SIGHUP)  # before the interpreter is even up
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            await poll_healthz(session, f"http://127.0.0.1:{port}/healthz", bool, [spawned])
            await until_answered(session, f"http://127.0.0.1:{port}", NEW_KEY, (200, "b"),
                                 spawned)
        assert "reload: config from" in log.read_text()
    finally:
        assert await stop(spawned) == 0, spawned.output()


def test_the_supervisor_starts_workers_with_sighup_blocked(tmp_path: Path) -> None:
    status = tmp_path / "status"
    script = f"open({str(status)!r}, 'w').write(open('/proc/self/status').read())"
    supervisor = Supervisor(lambda index: [sys.executable, "-c", script], 1)
    slot = supervisor._slots[0]
    supervisor._start(slot, time.monotonic())
    assert slot.process is not None
    assert slot.process.wait(10) == 0
    blocked = next(int(line.split()[1], 16) for line in status.read_text().splitlines()
                   if line.startswith("SigBlk:"))
    assert blocked & (1 << (signal.SIGHUP - 1))
    assert signal.SIGHUP not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # ours


async def test_a_sighup_while_stopping_does_not_cut_the_streams(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    proxy, base, _, _ = await start(start_upstream, tmp_path)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        await poll_healthz(session, f"{base}/healthz", bool, [proxy])
        started = asyncio.Event()
        stream = asyncio.create_task(stream_events(session, base, started))
        await asyncio.wait_for(started.wait(), 5)
        proxy.process.send_signal(signal.SIGTERM)
        await until(lambda: refused(base), what="the listener closed: stopping")
        proxy.process.send_signal(signal.SIGHUP)  # in the grace period, draining the stream
        received = await asyncio.wait_for(stream, 10)
    assert received.count(b'"by":"a"') == 20 and received.endswith(b"data: [DONE]\n\n")
    assert await asyncio.to_thread(proxy.process.wait, 10) == 0, proxy.output()


async def test_a_reload_that_leaves_providers_alone_keeps_their_discovered_models(
    make_config: MakeConfig, start_fake: StartFake,
) -> None:
    upstream = await start_fake(("found",))
    entry = upstream.provider(discover=True)
    config = make_config([entry], server={"port": 0})
    gateway_app = build_app(config)
    body = {"model": "found", "messages": []}
    async with running(config, app=gateway_app) as base, aiohttp.ClientSession() as session:
        async with session.post(base + CHAT, json=body) as response:
            assert response.status == 200
        gateway_app[LIVE].reload(make_config([entry], aliases={"other": "up/found"}))
        async with session.post(base + CHAT, json=body) as response:
            assert response.status == 200
        async with session.get(base + "/health") as response:
            assert response.status == 200
    assert upstream.calls[MODELS] == 1  # the new gateway kept the catalog: no wait, no second probe


async def test_a_reload_drops_every_key_only_when_the_file_says_so(
    make_config: MakeConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    a = {"name": "a", "type": "openai_compat", "base_url": "http://127.0.0.1:9/v1"}
    keyed = make_config([a], auth={"keys": [{"name": "k", "sha256": hash_secret(OLD_KEY)}]})
    live = build_app(keyed)[LIVE]
    unsaids: tuple[dict[str, object], ...] = ({}, {"auth": {}}, {"auth": {"keys": None}})
    for unsaid in unsaids:
        with pytest.raises(ConfigError, match="write `keys: \\[\\]` under `auth`"):
            live.reload(make_config([a], **unsaid))
        assert live.gateway.config is keyed and live.reloads == 0
    live.reload(make_config([a], auth={"keys": []}))
    assert live.gateway.keyring.open and live.reloads == 1
    assert "no gateway keys configured any more (auth.keys: [])" in caplog.text
