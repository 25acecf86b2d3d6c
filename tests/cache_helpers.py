"""The cache tests' client (tests/test_cache.py, test_redis_cache.py): the fake upstream
(tests/fake_upstream.py) numbers its answers, so a test tells a cached answer from a
fresh one by its ``id`` (``answer_id``) or, streamed, by its bytes (``sse``); ``post``
sends a chat request with the SDK fixture's key."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

CHAT = "/v1/chat/completions"


AUTH = {"Authorization": "Bearer sk-client-test"}  # what the SDK fixture sends


Reply = tuple[int, "dict[str, str]", bytes]


def sse(call: int, content: str) -> bytes:
    """One event of the fake upstream's default stream, written out here on purpose: a
    replayed stream must be these exact bytes."""
    chunk = {"id": f"chatcmpl-{call}", "object": "chat.completion.chunk", "created": 1,
             "model": "m", "choices": [{"index": 0, "delta": {"content": content},
                                        "finish_reason": None}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> Reply:
    async with session.post(url, json=body, headers={**AUTH, **(headers or {})}) as response:
        return response.status, dict(response.headers), await response.read()


def answer_id(reply: Reply) -> str:
    return str(orjson.loads(reply[2])["id"])
