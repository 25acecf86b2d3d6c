"""The real command line in subprocesses (issue #2, "Parallel model discovery" and
"Configuration"):

* ``proxy check``: reachability, auth and model count per provider, exit 1 when one
  fails: an upstream answering 401 is reported as an auth failure, a provider whose
  ``api_key_env`` is unset as such (and is not even asked);
* ``proxy models [--json]``: latency and models per provider, the table's columns;
* ``proxy serve --host H --port P`` overrides both the file and the environment;
* the installed ``proxy`` console script runs.

Every process started here is waited for with a timeout and, if still running, stopped
through its own handle.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from tests.cli_helpers import UNSET, cli_env, models_upstream, run, run_cli
from tests.conftest import StartUpstream
from tests.fake_upstream import MODELS, FakeUpstream

PROXY_SCRIPT = Path(sys.executable).parent / "proxy"  # the venv's console script


async def _config(start_upstream: StartUpstream, path: Path,
                  providers: dict[str, tuple[FakeUpstream, dict[str, Any]]]) -> str:
    entries = [{"name": name, "type": "openai_compat",
                "base_url": f"{await start_upstream(upstream.app())}/v1", **extra}
               for name, (upstream, extra) in providers.items()]
    return _write(path, {"providers": entries, "timeouts": {"discovery": 2}})


def _write(path: Path, config: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _rows(table: str) -> dict[str, str]:
    """Table lines by their first cell; the header under ``"HEADER"``."""
    lines = table.strip().splitlines()
    return {"HEADER": lines[0], **{line.split()[0]: line for line in lines[1:]}}


async def test_check_reports_auth_failures_and_missing_keys(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    good = models_upstream(models=("alpha", "beta"), latency=0.1)
    denied, keyless = models_upstream(status=401), models_upstream(models=("never-listed",))
    config = await _config(start_upstream, tmp_path / "check.yaml", {
        "good": (good, {}), "denied": (denied, {}), "keyless": (keyless, {"api_key_env": UNSET}),
    })
    code, out = await run_cli("check", "--config", config)
    assert code == 1, out
    rows = _rows(out)
    assert rows["HEADER"].split() == ["PROVIDER", "TYPE", "RESULT", "MODELS", "LATENCY"]
    good_row = rows["good"].split()
    assert good_row[:4] == ["good", "openai_compat", "ok", "2"]
    assert good_row[5] == "ms"
    assert int(good_row[4]) >= 90
    assert "FAILED" in rows["denied"]
    assert "rejected the credentials (HTTP 401)" in rows["denied"]
    assert "FAILED" in rows["keyless"]
    assert "API key missing" in rows["keyless"]
    assert UNSET in rows["keyless"]
    assert (good.calls[MODELS], denied.calls[MODELS], keyless.calls[MODELS]) == (1, 1, 0)

    only_denied = await _config(start_upstream, tmp_path / "denied.yaml",
                                {"denied": (models_upstream(status=401), {})})
    code, out = await run_cli("check", "--config", only_denied)
    assert code == 1, out
    assert "rejected the credentials" in _rows(out)["denied"]


async def test_models_json_and_table_carry_latency_and_models(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    good = models_upstream(models=("alpha", "org/beta"), latency=0.1)
    config = await _config(start_upstream, tmp_path / "models.yaml", {
        "good": (good, {}), "denied": (models_upstream(status=401), {}),
        "keyless": (models_upstream(models=("x",)), {"api_key_env": UNSET}),
    })
    (code, out), (table_code, table) = await asyncio.gather(
        run_cli("models", "--json", "--config", config), run_cli("models", "--config", config))
    assert code == 0, out
    providers = {p["provider"]: p for p in orjson.loads(out)["providers"]}
    assert list(providers) == ["good", "denied", "keyless"]
    assert providers["good"]["models"] == ["alpha", "org/beta"]
    assert isinstance(providers["good"]["latency_ms"], int | float)
    assert 90 <= providers["good"]["latency_ms"] < 5000
    assert all(isinstance(p["latency_ms"], int | float) for p in providers.values())
    assert (providers["denied"]["healthy"], providers["denied"]["models"]) == (False, [])
    assert "credentials" in providers["denied"]["error"]
    assert providers["keyless"]["healthy"] is False
    assert UNSET in providers["keyless"]["error"]

    assert table_code == 0, table
    lines = table.strip().splitlines()
    assert lines[0].split() == ["PROVIDER", "MODEL", "STATUS", "LATENCY"]
    good_rows = [line.split() for line in lines[1:] if line.startswith("good ")]
    assert [row[:3] for row in good_rows] == [["good", "alpha", "ok"], ["good", "org/beta", "ok"]]
    assert all(row[4] == "ms" and int(row[3]) >= 90 for row in good_rows)
    [denied_row] = [line for line in lines if line.startswith("denied ")]
    assert "rejected the credentials" in denied_row
    assert denied_row.rstrip().endswith(" ms")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def _answers(url: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session, \
                session.get(f"{url}/healthz") as response:
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def _spawn(args: list[str], env: dict[str, str], cwd: Path, log: Path
           ) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "proxy", *args], env=env, cwd=cwd,
                                stdout=output, stderr=subprocess.STDOUT)


async def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(process.wait, 5)
    except subprocess.TimeoutExpired:
        process.kill()
        await asyncio.to_thread(process.wait, 5)
        raise


async def test_serve_host_and_port_flags_override_file_and_env(tmp_path: Path) -> None:
    file_port, env_port, flag_port = (_free_port("127.0.0.2"), _free_port("127.0.0.3"),
                                      _free_port())
    config = _write(tmp_path / "serve.yaml",
                    {"server": {"host": "127.0.0.2", "port": file_port}})
    env = cli_env(PROXY_HOST="127.0.0.3", PROXY_PORT=str(env_port))
    log = tmp_path / "serve.log"
    process = _spawn(["serve", "--config", config, "--host", "127.0.0.1",
                      "--port", str(flag_port)], env, tmp_path, log)
    try:
        url = f"http://127.0.0.1:{flag_port}"
        deadline = time.monotonic() + 10
        while not await _answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"not serving on {url}: {log.read_text(errors='replace')}")
            await asyncio.sleep(0.05)
        assert f"listening on {url}" in log.read_text(errors="replace")
        assert not await _answers(f"http://127.0.0.2:{file_port}")
        assert not await _answers(f"http://127.0.0.3:{env_port}")
        assert not await _answers(f"http://127.0.0.3:{flag_port}")
    finally:
        code = await _stop(process)
    assert code == 0


async def test_console_script_runs(start_upstream: StartUpstream, tmp_path: Path) -> None:
    assert PROXY_SCRIPT.is_file(), f"{PROXY_SCRIPT} is not installed"
    code, out = await run(str(PROXY_SCRIPT), "--help", cwd=tmp_path)
    assert code == 0
    assert "serve" in out
    assert "check" in out
    config = await _config(start_upstream, tmp_path / "script.yaml",
                           {"one": (models_upstream(models=("m1",)), {})})
    code, out = await run(str(PROXY_SCRIPT), "models", "--json", "--config", config,
                           cwd=tmp_path)
    assert code == 0, out
    [provider] = orjson.loads(out)["providers"]
    assert (provider["provider"], provider["healthy"], provider["models"]) == ("one", True, ["m1"])
