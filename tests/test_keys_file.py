"""``auth.keys_file``: gateway keys kept in their own YAML file beside (or instead of)
``auth.keys`` (issue #4, "in the config or a separate keys file"); validated like the
inline ones, and read again on a reload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from proxy.app import build_app
from proxy.config.keys import hash_secret
from proxy.config.loader import ConfigError
from proxy.server.serve import running
from proxy.state import LIVE
from tests.conftest import MakeConfig
from tests.fake_upstream import FakeUpstream
from tests.keys_helpers import MESSAGES

INLINE, FILED, LATER = "sk-gw-inline-1", "sk-gw-filed-2", "sk-gw-later-3"


def key(name: str, secret: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "sha256": hash_secret(secret), **extra}


async def status(session: aiohttp.ClientSession, base: str, secret: str) -> int:
    async with session.post(f"{base}/v1/chat/completions",
                            headers={"Authorization": f"Bearer {secret}"},
                            json={"model": "m", "messages": MESSAGES}) as response:
        return response.status


async def test_keys_from_the_file_and_inline_both_work_and_a_reload_rereads_the_file(
    fake_upstream: FakeUpstream, make_config: MakeConfig, tmp_path: Path,
) -> None:
    url = fake_upstream.url.removesuffix("/v1")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(yaml.safe_dump([key("filed", FILED)]))
    provider = {"name": "up", "type": "openai_compat", "base_url": f"{url}/v1",
                "models": ["m"]}
    auth = {"keys": [key("inline", INLINE)], "keys_file": str(keys_file)}
    config = make_config([provider], server={"port": 0}, auth=auth)
    app = build_app(config)
    async with running(config, app=app) as base, aiohttp.ClientSession() as session:
        assert [await status(session, base, s) for s in (INLINE, FILED, LATER)] == [
            200, 200, 401]
        keys_file.write_text(yaml.safe_dump([key("later", LATER)]))
        app[LIVE].reload(make_config([provider], auth=auth))
        assert [await status(session, base, s) for s in (INLINE, FILED, LATER)] == [
            200, 401, 200]


@pytest.mark.parametrize(("content", "problem"), [
    (None, "auth.keys_file: cannot read"),
    ("", "holds no keys; an empty file would open the gateway to anyone"),
    ("[]", "holds no keys; an empty file would open the gateway to anyone"),
    ("keys: [", "is not valid YAML"),
    ("name: x", "{file}: must be a list of keys"),
    (yaml.safe_dump([{"name": "x"}]), "{file}[0].sha256: is required"),
    (yaml.safe_dump([key("inline", FILED)]), "{file}[0].name: duplicate key name 'inline'"),
    (yaml.safe_dump([key("other", INLINE)]),
     "{file}[0].sha256: the same secret as another key"),
])
def test_a_bad_keys_file_is_a_config_error_naming_the_file(
    make_config: MakeConfig, tmp_path: Path, content: str | None, problem: str,
) -> None:
    keys_file = tmp_path / "keys.yaml"
    if content is not None:
        keys_file.write_text(content)
    provider = {"name": "up", "type": "openai_compat", "base_url": "http://127.0.0.1:9/v1"}
    with pytest.raises(ConfigError) as caught:
        make_config([provider], auth={"keys": [key("inline", INLINE)],
                                      "keys_file": str(keys_file)})
    expected = problem.format(file=f"auth.keys_file ({keys_file})")
    assert any(expected in p for p in caught.value.problems), caught.value.problems
