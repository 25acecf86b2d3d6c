"""The real command line in a subprocess: ``python -m proxy serve``.

Issue #2: "``proxy serve --upstream http://127.0.0.1:PORT/v1`` is a drop-in for the
``openai`` SDK"; with no provider key it "serves chat completions, streamed and not, from
the bundled mock upstream"; "Invalid config exits with status 2 and one clear line per
problem naming the key". Every process started here is stopped by its ``Popen`` object.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from proxy.mock.payloads import GREETING
from tests.conftest import MockUpstream, StartFake
from tests.keys_helpers import authorizations, keyed

AsyncClientFactory = Callable[..., openai.AsyncOpenAI]
# Variables that would configure providers or the server behind the test's back.
_CONFIG_VARIABLES = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENROUTER_API_KEY", "OLLAMA_HOST")
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _CONFIG_VARIABLES and not k.startswith("PROXY_")}
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "proxy", *args], env=env, cwd=cwd,
                                stdout=output, stderr=subprocess.STDOUT)


def _output(log: Path) -> str:
    return log.read_text(errors="replace")


async def _stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then wait up to 5 s (in a thread: the test's loop serves the upstream)."""
    process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(process.wait, 5)
    except subprocess.TimeoutExpired:
        process.kill()
        await asyncio.to_thread(process.wait, 5)
        raise


async def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``/healthz`` for at most 10 s."""
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"proxy exited with {process.returncode}: {_output(log)}")
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail(f"proxy not ready within 10 s: {_output(log)}")


@asynccontextmanager
async def _serving(args: list[str], env: dict[str, str], cwd: Path
                   ) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """``proxy serve ARGS --port FREE``, ready; stopped on exit whatever happened."""
    port = _free_port()
    log = cwd / f"proxy-{port}.log"
    process = _spawn(["serve", *args, "--port", str(port)], env, cwd, log)
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_ready(url, process, log)
        yield url, process
    finally:
        if process.poll() is None:
            await _stop(process)


async def test_dropin_upstream_serves_the_sdk(
    mock_upstream: MockUpstream, openai_client: AsyncClientFactory, tmp_path: Path,
) -> None:
    async with _serving(["--upstream", mock_upstream.url], _clean_env(), tmp_path) as served:
        url, process = served
        client = openai_client(url)
        answer = await client.chat.completions.create(model="mock-gpt", messages=HELLO)
        assert answer.choices[0].message.content == f"{GREETING}hello"
        stream = await client.chat.completions.create(model="mock-gpt", messages=HELLO,
                                                      stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == f"{GREETING}hello"
        assert len([p for p in pieces if p]) == 8
        assert sorted([m.id async for m in client.models.list()]) == ["mock-embed", "mock-gpt"]
        await client.close()
        started = time.monotonic()
        assert await _stop(process) == 0
        assert time.monotonic() - started < 5


@pytest.mark.parametrize(("key_env", "expected"), [
    ({}, "Bearer sk-client-own"),
    ({"UPKEY": "sk-upstream-secret"}, "Bearer sk-upstream-secret"),
])
async def test_dropin_authorization(
    key_env: dict[str, str], expected: str, start_fake: StartFake,
    openai_client: AsyncClientFactory, tmp_path: Path,
) -> None:
    upstream = await start_fake(("rec",), pieces=("recorded",))
    args = ["--upstream", upstream.url, *(["--api-key-env", "UPKEY"] if key_env else [])]
    async with _serving(args, _clean_env(**key_env), tmp_path) as (url, _):
        client = openai_client(url, api_key="sk-client-own")
        answer = await client.chat.completions.create(model="any-model", messages=HELLO)
        assert answer.choices[0].message.content == "recorded"
    assert [headers.get("Authorization") for headers in upstream.headers()] == [expected]


async def test_dropin_lists_models_with_each_callers_own_key(
    start_fake: StartFake, openai_client: AsyncClientFactory, tmp_path: Path,
) -> None:
    """Issue 9: with no upstream key, models.list() was empty (a 401 under ``errors``),
    models.retrieve() a 404 and /health a 503."""
    upstream = keyed(await start_fake())
    async with _serving(["--upstream", upstream.url], _clean_env(), tmp_path) as (url, _):
        a = openai_client(url, api_key="sk-caller-a")
        b = openai_client(url, api_key="sk-caller-b")
        assert [(m.id, m.owned_by) async for m in a.models.list()] == [("model-a", "org-a")]
        assert [m.id async for m in b.models.list()] == ["model-b1", "model-b2"]
        assert (await a.models.retrieve("model-a")).created == 1700000001
        with pytest.raises(openai.NotFoundError):
            await b.models.retrieve("model-a")
        async with aiohttp.ClientSession() as http, http.get(f"{url}/health") as response:
            assert response.status == 200, await response.text()
    assert set(authorizations(upstream)) <= {None, "Bearer sk-caller-a", "Bearer sk-caller-b"}


async def test_invalid_config_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "timeouts: {connect: -1}\n"
        "providers:\n"
        "  - {name: a, type: no_such_type, base_url: 'http://127.0.0.1:1/v1'}\n"
        "  - {name: b, type: openai_compat, base_url: 'ftp://example.invalid'}\n")
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        env=_clean_env(), cwd=tmp_path, capture_output=True, timeout=10, check=False)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 3, lines
    [connect] = [line for line in lines if "timeouts.connect: " in line]
    [type_] = [line for line in lines if "providers[0].type: " in line]
    [base_url] = [line for line in lines if "providers[1].base_url: " in line]
    assert "-1" in connect
    assert "no_such_type" in type_
    assert "openai_compat" in type_
    assert "ollama" in type_  # the known types are listed
    assert "providers[1].base_url: must start with http:// or https://" in base_url
    assert result.stdout == b""


async def test_demo_mode_serves_mock_gpt_offline(
    openai_client: AsyncClientFactory, tmp_path: Path,
) -> None:
    assert not (tmp_path / "proxy.yaml").exists()
    async with _serving([], _clean_env(), tmp_path) as (url, process):
        client = openai_client(url)
        answer = await client.chat.completions.create(model="mock-gpt", messages=HELLO)
        assert answer.choices[0].message.content == f"{GREETING}hello"
        stream = await client.chat.completions.create(model="mock-gpt", messages=HELLO,
                                                      stream=True)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == f"{GREETING}hello"
        assert len([p for p in pieces if p]) > 1
        await client.close()
        assert await _stop(process) == 0
