"""The access log and the log format, in the gateway as a real process (issue 10,
"Access log"): ``python -m proxy serve`` with its output going to a file (not a
terminal, so JSON by default), a real upstream on loopback (``tests/faulty.py``), and
known traffic: a 401, a 403, a 429 from a key's rpm limit, a cache miss then hit, a
stream, a client that goes away mid-stream, an upstream cut mid-stream, a refused
upstream (502) and an unknown route. Every line must parse as JSON, each request must
have exactly one access line with the right fields, and no secret may appear; then
``access_log: false``, ``PROXY_LOG_FORMAT=text``, ``--log-level WARNING`` (over
``PROXY_LOG_LEVEL=DEBUG``), two workers, a SIGHUP turning the access log off, and
text by default when the output is a terminal (a pty).
"""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from proxy.config.keys import hash_secret
from tests.conftest import StartUpstream
from tests.faulty import CHAT, Faults, chat, providers
from tests.procs import Proc, clean_env, free_port, gateway_process, stop

UPSTREAM_KEY = "sk-upstream-Ac7dLq2WnZ9xPe4R"
LIMITED_KEY = "sk-gw-limited-Ub3kMv8TsY1oQh6J"
FULL_KEY = "sk-gw-full-Gf5rNc0XiW2pLa9E"
SECRETS = (UPSTREAM_KEY, LIMITED_KEY, FULL_KEY, hash_secret(LIMITED_KEY),
           hash_secret(FULL_KEY))
KEYS = [{"name": "limited", "sha256": hash_secret(LIMITED_KEY), "models": ["ok-m"],
         "rpm": 2},
        {"name": "full", "sha256": hash_secret(FULL_KEY)}]
SAME = chat("ok-m", temperature=0)  # deterministic: cached
# (request id, key, method, path, body, expected status)
CALLS: list[tuple[str, str | None, str, str, Any, int]] = [
    ("t-401", None, "POST", CHAT, chat("ok-m"), 401),
    ("t-403", LIMITED_KEY, "POST", CHAT, chat("drop-m"), 403),
    ("t-ok-1", LIMITED_KEY, "POST", CHAT, chat("ok-m"), 200),
    ("t-ok-2", LIMITED_KEY, "POST", CHAT, chat("ok-m"), 200),
    ("t-429", LIMITED_KEY, "POST", CHAT, chat("ok-m"), 429),  # rpm 2
    ("t-miss", FULL_KEY, "POST", CHAT, SAME, 200),
    ("t-hit", FULL_KEY, "POST", CHAT, SAME, 200),
    ("t-stream", FULL_KEY, "POST", CHAT, chat("ok-m", stream=True), 200),
    ("t-drop", FULL_KEY, "POST", CHAT, chat("drop-m", stream=True), 200),
    ("t-dead", FULL_KEY, "POST", CHAT, chat("dead-m"), 502),
    ("t-404", FULL_KEY, "GET", "/nowhere", None, 404),
]


def config(upstream: str, dead_port: int, **extra: Any) -> dict[str, Any]:
    return {"providers": providers(upstream, dead_port, api_key_env="UP_KEY"),
            "auth": {"keys": KEYS}, "retries": {"max_attempts": 1}, **extra}


@asynccontextmanager
async def gateway(start_upstream: StartUpstream, faults: Faults, port: int, tmp_path: Path,
                  **kwargs: Any) -> AsyncIterator[Proc]:
    upstream = await start_upstream(faults.app())
    extra = kwargs.pop("extra", {})
    env = {"UP_KEY": UPSTREAM_KEY, **kwargs.pop("env", {})}
    async with gateway_process(tmp_path, config(upstream, port, **extra), env=env,
                               **kwargs) as proc:
        yield proc


async def call(session: aiohttp.ClientSession, url: str, request_id: str, key: str | None,
               method: str, path: str, body: Any) -> int:
    headers = {"X-Request-ID": request_id}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    async with session.request(method, url + path, json=body, headers=headers) as response:
        await response.read()
        return response.status


async def client_goes_away(session: aiohttp.ClientSession, url: str, faults: Faults) -> None:
    """A stream the client leaves after its first event (the upstream's is endless)."""
    headers = {"X-Request-ID": "t-gone", "Authorization": f"Bearer {FULL_KEY}"}
    async with session.post(url + CHAT, json=chat("endless-m", stream=True),
                            headers=headers) as response:
        assert response.status == 200
        await response.content.readuntil(b"\n\n")
        response.close()
    await asyncio.wait_for(faults.endless_cancelled.wait(), 15)


async def logged(proc: Proc, text: str, times: int) -> None:
    """Until ``text`` is in the output ``times`` times (bounded)."""
    deadline = time.monotonic() + 15
    while proc.spawned.log.read_text().count(text) < times:
        assert time.monotonic() < deadline, proc.output()
        await asyncio.sleep(0.05)


def lines_of(proc: Proc) -> list[dict[str, Any]]:
    """Every line of the process's output, each parsed as JSON (fails on one that is not)."""
    parsed = []
    for line in proc.spawned.log.read_text().splitlines():
        try:
            parsed.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            pytest.fail(f"not JSON: {line!r}")
    return parsed


def access_lines(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The access lines by request id, but the readiness probes' (logged like any other
    request); fails if a request has more than one."""
    found: dict[str, dict[str, Any]] = {}
    for line in lines:
        if line["logger"] == "proxy.access" and line["route"] != "/healthz":
            assert line["request_id"] not in found, line
            found[line["request_id"]] = line
    return found


@pytest.fixture
def faults() -> Faults:
    return Faults()


async def test_one_json_access_line_per_request_and_no_secret(
    start_upstream: StartUpstream, faults: Faults, closed_port: int, tmp_path: Path,
) -> None:
    async with gateway(start_upstream, faults, closed_port, tmp_path) as proc:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            statuses = [await call(session, proc.url, *c[:5]) for c in CALLS]
            await client_goes_away(session, proc.url, faults)
        assert statuses == [c[5] for c in CALLS], proc.output()
        assert await stop(proc.spawned) == 0, proc.output()  # the output is complete
    output = proc.spawned.log.read_text()
    assert set(faults.authorizations) == {f"Bearer {UPSTREAM_KEY}"}  # the key was in play
    assert [s for s in SECRETS if s in output] == [], output
    assert "Bearer" not in output
    lines = lines_of(proc)
    assert all({"time", "level", "logger"} <= line.keys() for line in lines), lines
    seen = access_lines(lines)
    assert set(seen) == {c[0] for c in CALLS} | {"t-gone"}, output
    check_fields(seen)
    # A line logged while a request was handled names it: the 502's warning.
    (warning,) = [x for x in lines if x["logger"] == "proxy.errors"]
    assert warning["request_id"] == "t-dead" and warning["level"] == "WARNING"
    # The effective config, once, secrets redacted.
    (started,) = [x for x in lines if x.get("message", "").startswith("effective config")]
    provider = started["config"]["providers"][0]
    assert (provider["api_key_env"], provider["api_key"]) == ("UP_KEY", "***")
    assert [k["sha256"] for k in started["config"]["auth"]["keys"]] == ["***", "***"]


def check_fields(seen: dict[str, dict[str, Any]]) -> None:
    for request_id, status in [(c[0], c[5]) for c in CALLS] + [("t-gone", 499)]:
        assert seen[request_id]["status"] == status, seen[request_id]
    refused = seen["t-401"]
    assert (refused["error_code"], refused["key_name"], refused["method"]) == (
        "invalid_api_key", None, "POST")
    assert seen["t-403"]["error_code"] == "model_not_allowed"
    assert seen["t-403"]["key_name"] == "limited"
    assert seen["t-429"]["error_code"] == "rate_limit_exceeded"
    ok = seen["t-ok-1"]
    assert (ok["route"], ok["key_name"], ok["model"], ok["provider"], ok["upstream_model"],
            ok["upstream_status"], ok["attempts"], ok["taken"], ok["stream"]) == (
        "/v1/chat/completions", "limited", "ok-m", "ok", "ok-m", 200, 1, None, False)
    assert ok["bytes_in"] > 0 and ok["bytes_out"] > 0 and ok["client"] == "127.0.0.1"
    assert 0 <= ok["overhead_ms"] <= ok["ttfb_ms"] <= ok["duration_ms"]
    assert ok["upstream_ms"] > 0 and ok["time"].endswith("Z") and len(ok["time"]) == 24
    assert {"tokens_in", "tokens_out", "tokens_source"} <= ok.keys()
    assert (seen["t-miss"]["cache"], seen["t-hit"]["cache"]) == ("miss", "hit")
    stream = seen["t-stream"]
    assert (stream["stream"], stream["ended"], stream["cache"]) == (True, "completed", None)
    assert stream["ttfb_ms"] is not None
    assert (seen["t-drop"]["ended"], seen["t-drop"]["status"]) == ("upstream_error", 200)
    assert (seen["t-gone"]["ended"], seen["t-gone"]["stream"]) == ("client_disconnect", True)
    dead = seen["t-dead"]
    assert (dead["error_code"], dead["provider"]) == ("upstream_unreachable", "dead")
    assert seen["t-404"]["error_code"] == "not_found"


async def one_request(proc: Proc) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        assert await call(session, proc.url, "t-one", FULL_KEY, "POST", CHAT,
                          chat("ok-m")) == 200
    assert await stop(proc.spawned) == 0, proc.output()


async def test_access_log_false_writes_no_access_line(
    start_upstream: StartUpstream, faults: Faults, closed_port: int, tmp_path: Path,
) -> None:
    async with gateway(start_upstream, faults, closed_port, tmp_path,
                       extra={"logging": {"access_log": False}}) as proc:
        await one_request(proc)
    lines = lines_of(proc)
    assert [x for x in lines if x["logger"] == "proxy.server"], lines  # still logging
    assert access_lines(lines) == {}, lines


async def test_log_level_flag_hides_access_lines_over_the_environment(
    start_upstream: StartUpstream, faults: Faults, closed_port: int, tmp_path: Path,
) -> None:
    async with gateway(start_upstream, faults, closed_port, tmp_path, log_level="WARNING",
                       env={"PROXY_LOG_LEVEL": "DEBUG"}) as proc:
        await one_request(proc)
    lines = lines_of(proc)
    assert {x["level"] for x in lines} <= {"WARNING", "ERROR"}, lines


async def test_text_format_from_the_environment(
    start_upstream: StartUpstream, faults: Faults, closed_port: int, tmp_path: Path,
) -> None:
    async with gateway(start_upstream, faults, closed_port, tmp_path,
                       env={"PROXY_LOG_FORMAT": "text"}) as proc:
        await one_request(proc)
    output = proc.spawned.log.read_text()
    assert not output.lstrip().startswith("{"), output
    access = [x for x in output.splitlines() if " INFO proxy.access: POST " in x]
    assert len(access) == 1, output
    assert " POST /v1/chat/completions 200 " in access[0]
    assert "request_id=t-one" in access[0] and "key_name=full" in access[0]
    assert FULL_KEY not in output and UPSTREAM_KEY not in output


async def test_workers_log_json_one_access_line_per_request(
    start_upstream: StartUpstream, faults: Faults, closed_port: int, tmp_path: Path,
) -> None:
    async with gateway(start_upstream, faults, closed_port, tmp_path,
                       extra={"server": {"workers": 2}}) as proc:
        await logged(proc, "listening on", 2)  # both workers, not only the first ready
        # A connection per request: SO_REUSEPORT spreads them over the workers.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                         connector=aiohttp.TCPConnector(force_close=True)
                                         ) as session:
            for n in range(6):
                assert await call(session, proc.url, f"t-w{n}", FULL_KEY, "POST", CHAT,
                                  chat("ok-m")) == 200
        assert await stop(proc.spawned) == 0, proc.output()
    lines = lines_of(proc)
    assert set(access_lines(lines)) == {f"t-w{n}" for n in range(6)}
    assert len([x for x in lines if x.get("message", "").startswith("effective")]) == 1
    listening = [x for x in lines if "listening on" in x.get("message", "")]
    assert len(listening) == 2, lines  # both workers, in JSON


async def test_sighup_applies_a_new_logging_section(
    start_upstream: StartUpstream, faults: Faults, closed_port: int, tmp_path: Path,
) -> None:
    async with gateway(start_upstream, faults, closed_port, tmp_path) as proc:
        path = tmp_path / "gateway.yaml"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            assert await call(session, proc.url, "t-before", FULL_KEY, "POST", CHAT,
                              chat("ok-m")) == 200
            changed = yaml.safe_load(path.read_text())
            changed["logging"] = {"access_log": False, "level": "DEBUG"}
            path.write_text(yaml.safe_dump(changed))
            proc.spawned.process.send_signal(signal.SIGHUP)
            await logged(proc, "reload: config from", 1)
            assert await call(session, proc.url, "t-after", FULL_KEY, "POST", CHAT,
                              chat("ok-m")) == 200
        assert await stop(proc.spawned) == 0, proc.output()
    assert set(access_lines(lines_of(proc))) == {"t-before"}


def read_until(fd: int, text: bytes, within: float) -> bytes:
    """What the terminal ``fd`` shows until ``text`` appears (bounded)."""
    seen = b""
    deadline = time.monotonic() + within
    while text not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            seen += os.read(fd, 65536)
    return seen


def test_auto_format_is_text_on_a_terminal(tmp_path: Path) -> None:
    port = free_port()
    terminal, side = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve", "--upstream", "http://127.0.0.1:9/v1",
         "--port", str(port)], stdin=subprocess.DEVNULL, stdout=side, stderr=side,
        env=clean_env(), cwd=tmp_path)
    os.close(side)
    try:
        shown = read_until(terminal, b"listening on", 20)
    finally:
        process.terminate()
        process.wait(10)
        os.close(terminal)
    assert b" INFO proxy.server: worker 0 " in shown, shown
    assert b'{"time"' not in shown, shown
