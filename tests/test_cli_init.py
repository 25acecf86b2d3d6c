"""``proxy init`` (issue 10, CLI): the real command in a subprocess, against a fake Ollama
on loopback (``OLLAMA_HOST`` points at it) with a fake ``OPENAI_API_KEY``; answered
through a pseudo-terminal, as a person would, or with ``--yes`` and stdin closed.

What it writes is checked by the real loader (``proxy check --offline``), and for the
one thing that must never be in it: the key's value.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from aiohttp import web

from proxy.cli.init_wizard import KEY_PROVIDERS, UNSUPPORTED_KEYS, ollama_url
from tests.cli_helpers import WAIT, cli_env, on_terminal
from tests.conftest import StartUpstream

FAKE_KEY = "sk-init-test-NEVER-WRITTEN-0123456789"
OLLAMA_MODELS = ("llama3.2:1b", "qwen2.5:0.5b")


async def fake_ollama(start_upstream: StartUpstream) -> str:
    """An Ollama that lists two models; its ``host:port``, as ``OLLAMA_HOST`` holds it."""
    async def tags(request: web.Request) -> web.Response:
        return web.json_response({"models": [{"name": m, "size": 1} for m in OLLAMA_MODELS]})

    app = web.Application()
    app.router.add_get("/api/tags", tags)
    return (await start_upstream(app)).removeprefix("http://")


def _env(ollama: str, **extra: str) -> dict[str, str]:
    """No provider key of the caller's (a GROQ_API_KEY on the machine would add a
    provider), only the fake ones."""
    keys = {key_env for _, key_env, _ in KEY_PROVIDERS} | set(UNSUPPORTED_KEYS)
    env = {k: v for k, v in cli_env().items() if k not in keys}
    return {**env, "OLLAMA_HOST": ollama, "OPENAI_API_KEY": FAKE_KEY, "TERM": "xterm",
            **extra}


async def _check_offline(path: Path) -> tuple[int, str]:
    """``proxy check --offline`` on ``path``, with the variable the file names set."""
    return await _cli("check", "--offline", "--config", str(path),
                      env=cli_env(OPENAI_API_KEY=FAKE_KEY))


async def test_init_on_a_terminal_writes_what_was_answered(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    ollama = await fake_ollama(start_upstream)
    path = tmp_path / "proxy.yaml"
    async with on_terminal("init", "--config", str(path), env=_env(ollama)) as term:
        await term.expect("Include ollama: Ollama at http://")
        await term.expect("2 models? [Y/n]")
        term.send("")  # the default: yes
        await term.expect("Include openai: $OPENAI_API_KEY is set")
        term.send("maybe")
        await term.expect("please answer y or n")
        term.send("y")
        await term.expect("Port to listen on [8080]")
        term.send("99999")
        await term.expect("a port is a number")
        term.send("9191")
        await term.expect("Add a gateway key")
        term.send("yes")
        assert await term.finish() == 0, term.text()
    [secret] = re.findall(r"gateway key 'admin': (sk-gw-\S+)", term.text())
    text = path.read_text()
    assert FAKE_KEY not in text and secret not in text
    assert "api_key_env: OPENAI_API_KEY" in text
    assert all(model in text for model in OLLAMA_MODELS)
    raw = yaml.safe_load(text)
    assert raw["server"]["port"] == 9191
    assert [(p["name"], p["type"]) for p in raw["providers"]] == [
        ("ollama", "ollama"), ("openai", "openai_compat")]
    assert raw["providers"][0]["base_url"] == f"http://{ollama}"
    [key] = raw["auth"]["keys"]
    assert key == {"name": "admin", "sha256": hashlib.sha256(secret.encode()).hexdigest()}
    code, out = await _check_offline(path)
    assert code == 0 and "2 providers, 1 gateway keys" in out, out


async def test_init_can_leave_out_what_was_found(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    ollama = await fake_ollama(start_upstream)
    path = tmp_path / "proxy.yaml"
    async with on_terminal("init", "--config", str(path), env=_env(ollama)) as term:
        for answer in ("y", "n", "", "n"):  # ollama yes, openai no, port 8080, no key
            await term.expect("] ")
            term.send(answer)
        assert await term.finish() == 0, term.text()
    raw = yaml.safe_load(path.read_text())
    assert [p["name"] for p in raw["providers"]] == ["ollama"]
    assert "auth" not in raw and raw["server"]["port"] == 8080
    code, out = await _check_offline(path)
    assert code == 0 and "config ok" in out, out


async def test_init_yes_with_stdin_closed_takes_every_provider_found(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    ollama = await fake_ollama(start_upstream)
    env = _env(ollama, ANTHROPIC_API_KEY="sk-ant-NEVER-WRITTEN")
    code, out = await _init(tmp_path, "--yes", env=env)
    assert code == 0, out
    path = tmp_path / "proxy.yaml"  # the default: ./proxy.yaml in the working directory
    text = path.read_text()
    assert FAKE_KEY not in text and FAKE_KEY not in out
    assert "NEVER-WRITTEN" not in text + out
    assert "# ANTHROPIC_API_KEY is set, but no provider type speaks that API" in text
    assert "api_key_env: OPENAI_API_KEY" in text and "sk-gw-" not in out
    raw = yaml.safe_load(text)
    assert [p["name"] for p in raw["providers"]] == ["ollama", "openai"]
    assert "auth" not in raw
    code, out = await _check_offline(path)
    assert code == 0 and "config ok" in out and "2 providers" in out, out


async def test_init_refuses_to_overwrite_without_force(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    ollama = await fake_ollama(start_upstream)
    path = tmp_path / "proxy.yaml"
    path.write_text("# mine\n")
    code, out = await _init(tmp_path, "--yes", env=_env(ollama))
    assert code == 1 and "already exists" in out and "--force" in out, out
    assert path.read_text() == "# mine\n"
    code, out = await _init(tmp_path, "--yes", "--force", env=_env(ollama))
    assert code == 0, out
    assert "name: ollama" in path.read_text()
    assert os.listdir(tmp_path) == ["proxy.yaml"]  # no temporary file left


async def test_init_without_a_terminal_or_yes_refuses_at_once(tmp_path: Path) -> None:
    code, out = await _init(tmp_path, env=_env("127.0.0.1:9"))
    assert code == 2 and "--yes" in out, out
    assert not (tmp_path / "proxy.yaml").exists()


async def test_init_with_nothing_found_writes_a_commented_demo_config(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in _env("127.0.0.1:9").items() if k != "OPENAI_API_KEY"}
    code, out = await _init(tmp_path, "--yes", env=env)
    assert code == 0 and "Found no provider" in out and "built-in mock" in out, out
    text = (tmp_path / "proxy.yaml").read_text()
    assert "# providers:" in text and "built-in mock" in text
    assert "providers" not in yaml.safe_load(text)
    code, out = await _check_offline(tmp_path / "proxy.yaml")
    assert code == 0 and "built-in mock" in out, out  # a valid file: demo mode


async def _init(cwd: Path, *args: str, env: dict[str, str]) -> tuple[int, str]:
    return await _cli("init", *args, env=env, cwd=cwd)


async def _cli(*args: str, env: dict[str, str], cwd: Path | None = None) -> tuple[int, str]:
    """``python -m proxy ARGS`` with stdin closed; (exit, stdout + stderr)."""
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", *args], env=env, cwd=cwd,
        stdin=subprocess.DEVNULL, capture_output=True, timeout=WAIT, check=False)
    return result.returncode, (result.stdout + result.stderr).decode()


async def test_init_ended_with_ctrl_d_writes_nothing(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    ollama = await fake_ollama(start_upstream)
    path = tmp_path / "proxy.yaml"
    async with on_terminal("init", "--config", str(path), env=_env(ollama)) as term:
        await term.expect("[Y/n] ")
        term.send("\x04")  # end of input, as the terminal's Ctrl-D sends it
        assert await term.finish() == 1, term.text()
    assert "nothing written" in term.text()
    assert not path.exists()


def test_ollama_host_is_read_as_ollama_reads_it() -> None:
    assert ollama_url({}) == "http://127.0.0.1:11434"
    assert ollama_url({"OLLAMA_HOST": "10.1.2.3"}) == "http://10.1.2.3:11434"
    assert ollama_url({"OLLAMA_HOST": "127.0.0.1:9999"}) == "http://127.0.0.1:9999"
    assert ollama_url({"OLLAMA_HOST": "https://box/"}) == "https://box"  # port 443
    assert ollama_url({"OLLAMA_HOST": "http://box:8000"}) == "http://box:8000"
