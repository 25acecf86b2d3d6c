"""``proxy check --offline`` (issue 10, CLI): validate the configuration without
contacting any provider, like ``nginx -t``. The real CLI in a subprocess; the upstream
counts calls, so "offline" is checked, not assumed."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.cli_helpers import models_upstream, run_cli
from tests.conftest import StartUpstream


def write(tmp_path: Path, config: dict[str, object]) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_a_valid_file_is_reported_without_asking_its_providers(
    start_upstream: StartUpstream, tmp_path: Path,
) -> None:
    upstream = models_upstream(models=("m",))
    url = await start_upstream(upstream.app())
    path = write(tmp_path, {"providers": [
        {"name": "local", "type": "openai_compat", "base_url": f"{url}/v1"}]})
    code, out = await run_cli("check", "--offline", "--config", str(path))
    assert code == 0, out
    assert "config ok" in out and "1 providers" in out and "local" in out, out
    assert "the client's own" in out
    assert upstream.calls.total() == 0, "asked while offline"


async def test_an_unset_key_variable_fails_offline_too(tmp_path: Path) -> None:
    path = write(tmp_path, {"providers": [
        {"name": "paid", "type": "openai_compat", "base_url": "http://127.0.0.1:9/v1",
         "api_key_env": "PROXY_TEST_UNSET_KEY"}]})
    code, out = await run_cli("check", "--offline", "--config", str(path))
    assert code == 1, out
    assert "$PROXY_TEST_UNSET_KEY NOT SET" in out


async def test_an_invalid_file_exits_2_with_its_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, {"providers": [
        {"name": "bad", "type": "openai_compat", "base_url": "ftp://x"}]})
    code, _ = await run_cli("check", "--offline", "--config", str(path))
    assert code == 2


async def test_no_providers_is_a_valid_demo_file(tmp_path: Path) -> None:
    """What ``proxy init`` writes when it finds nothing: ``serve`` runs the demo mock, so
    the file is valid (the online ``check`` still exits 1: it has nothing to check)."""
    path = write(tmp_path, {"server": {"port": 8080}})
    code, out = await run_cli("check", "--offline", "--config", str(path))
    assert code == 0 and "built-in mock" in out, out
