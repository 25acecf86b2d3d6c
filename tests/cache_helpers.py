"""The cache tests' upstream and client (tests/test_cache.py, test_redis_cache.py):
``Upstream`` counts calls and numbers its answers, so a test tells a cached answer from
a fresh one by its ``id``; ``post`` sends a chat request with the SDK fixture's key."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import web

CHAT = "/v1/chat/completions"


AUTH = {"Authorization": "Bearer sk-client-test"}  # what the SDK fixture sends


Reply = tuple[int, "dict[str, str]", bytes]


class Upstream:
    """Counts calls; answers ``status`` (a JSON body padded with ``pad`` bytes) or, when
    asked to stream, three SSE events and ``[DONE]``."""

    def __init__(self, status: int = 200, pad: int = 0):
        self.status, self.pad = status, pad
        self.calls = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(CHAT, self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        self.calls += 1
        if self.status != 200:
            error = {"error": {"message": f"failure {self.calls}", "type": "x", "code": None}}
            return web.json_response(error, status=self.status)
        if not payload.get("stream"):
            return web.json_response({"id": f"answer-{self.calls}", "pad": "x" * self.pad},
                                     headers={"X-Request-ID": f"upstream-{self.calls}"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("one", " two", " three"):
            await response.write(sse(self.calls, word))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def sse(call: int, content: str) -> bytes:
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
