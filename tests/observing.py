"""A real gateway app in this process with an observer of its own: the records
(``proxy/record.py``) its requests leave, for tests of what observers are told."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from proxy.app import build_app
from proxy.config.loader import Config
from proxy.observe.observers import OBSERVERS
from proxy.record import Record
from proxy.server.serve import running
from tests import polling

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {"id": "x", "object": "chat.completion", "choices": [],
          "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}


@asynccontextmanager
async def observed(config: Config) -> AsyncIterator[tuple[str, list[Record]]]:
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, host="127.0.0.1", port=0))
    app = build_app(config)
    seen: list[Record] = []
    app[OBSERVERS].observers.append(seen.extend)
    async with running(config, app=app) as url:
        yield url, seen


async def until(seen: list[Record], count: int) -> None:
    """Poll (tests/polling.py) until ``count`` records were observed."""
    await polling.until(lambda: len(seen) >= count, 2.0,
                        lambda: f"{len(seen)} records, wanted {count}")


def provider(name: str, url: str) -> dict[str, object]:
    return {"name": name, "type": "openai_compat", "base_url": f"{url}/v1", "models": ["m"]}


def answering(body: dict[str, Any]) -> web.Application:
    """An upstream whose chat completions all answer ``body``."""
    async def chat(request: web.Request) -> web.Response:
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app
