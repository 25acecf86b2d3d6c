"""The usage tests' gateway and clients (tests/test_usage*.py): ``usage_gateway`` puts
the usage fake (tests/usage_fake.py) behind a real gateway with an observer, with the
cache off; ``get_usage`` reads ``/v1/usage``; ``KEYS``/``SECRETS`` are gateway keys, one
an admin, and ``row`` the totals ``REPORTED`` usage gives one key."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
from openai.types.chat import ChatCompletionMessageParam

from proxy.config.keys import hash_secret
from proxy.record import Record, Usage
from tests.conftest import MakeConfig, StartUpstream
from tests.observing import observed, provider
from tests.usage_fake import UsageUpstream

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi there"}]
CHAT = {"model": "m", "messages": MESSAGES}


STREAM = {**CHAT, "stream": True}


REPORTED = Usage(11, 7, 3, 2, "reported")


@asynccontextmanager
async def usage_gateway(start_upstream: StartUpstream, make_config: MakeConfig,
                        **raw: Any) -> AsyncIterator[tuple[str, str, UsageUpstream,
                                                           list[Record]]]:
    """(gateway URL, upstream URL, upstream, records) with the cache off by default."""
    fake = UsageUpstream()
    upstream = await start_upstream(fake.app())
    raw.setdefault("cache", {"enabled": False})
    async with observed(make_config([provider("up", upstream)], **raw)) as (url, seen):
        yield url, upstream, fake, seen


async def post_raw(url: str, body: dict[str, Any], headers: dict[str, str] | None = None
                   ) -> bytes:
    async with (aiohttp.ClientSession() as session,
                session.post(f"{url}/v1/chat/completions", data=orjson.dumps(body),
                             headers={"Content-Type": "application/json", **(headers or {})}
                             ) as response):
        assert response.status == 200
        return await response.read()


async def get_usage(url: str, secret: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    async with (aiohttp.ClientSession() as session,
                session.get(f"{url}/v1/usage", headers=headers) as response):
        return response.status, orjson.loads(await response.read())


SECRETS = {"alice": "sk-gw-alice-1", "bob": "sk-gw-bob-1", "ops": "sk-gw-ops-1"}


KEYS = [{"name": name, "sha256": hash_secret(secret), **({"admin": True} if name == "ops"
                                                          else {})}
        for name, secret in SECRETS.items()]


def row(key: str, requests: int) -> dict[str, Any]:
    return {"key": key, "model": "m", "requests": requests, "input_tokens": 11 * requests,
            "output_tokens": 7 * requests, "cached_tokens": 3 * requests,
            "reasoning_tokens": 2 * requests, "estimated_requests": 0}
