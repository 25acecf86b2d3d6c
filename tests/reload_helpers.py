"""The reload tests' upstreams and config (tests/test_reload.py, test_reload_safety.py):
each ``named_upstream`` answers with its own name, so a request shows which provider a
(re)loaded config routes it to; ``until_answered`` polls for that, bounded."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.config.keys import hash_secret
from tests.fake_upstream import DONE, FakeUpstream, Reply, sse
from tests.procs import Spawned

CHAT = "/v1/chat/completions"


OLD_KEY, NEW_KEY = "gk-old-secret-1", "gk-new-secret-2"


def named_upstream(name: str) -> web.Application:
    """The counting fake upstream, answering with its name; ``"stream": true`` gets 20
    events naming it, 50 ms apart (a stream that outlasts a reload). No model listing:
    the configs list the models, and which one serves ``m`` is what a reload changes."""
    fake = FakeUpstream(pieces=(name,), interval=0.05,
                        events=(*(sse({"n": n, "by": name}) for n in range(20)), DONE))
    fake.models = Reply(status=404)
    return fake.app()


def config_text(providers: dict[str, str], serving: str, key: str, **extra: Any) -> str:
    """All providers, ``serving`` the one whose static list has model ``m``."""
    entries = [{"name": name, "type": "openai_compat", "base_url": f"{url}/v1",
                "models": ["m"] if name == serving else [f"only-{name}"]}
               for name, url in providers.items()]
    return yaml.safe_dump({"providers": entries, "cache": {"enabled": False},
                           "auth": {"keys": [{"name": key, "sha256": hash_secret(key)}]},
                           **extra})


async def ask(session: aiohttp.ClientSession, base: str, key: str) -> tuple[int, str]:
    """(status, the upstream that answered or the error code)."""
    async with session.post(base + CHAT, headers={"Authorization": f"Bearer {key}"},
                            json={"model": "m", "messages": []}) as response:
        body = await response.json()
    if response.status != 200:
        return response.status, body["error"]["code"]
    return 200, body["choices"][0]["message"]["content"]


async def until_answered(session: aiohttp.ClientSession, base: str, key: str,
                         expected: tuple[int, str], proxy: Spawned, within: float = 10.0
                         ) -> None:
    deadline = time.monotonic() + within
    while (seen := await ask(session, base, key)) != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"still {seen}, not {expected}\n{proxy.output()}")
        await asyncio.sleep(0.05)
