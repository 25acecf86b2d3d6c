"""Small upstreams and clients about keys, each shared by two test files:

* ``keyed_upstream``: lists different models per caller key (``MODELS_BY_KEY``), 401
  for any other key, recording each ``Authorization`` it got (the drop-in tests);
* ``headers_upstream``: records each chat request's headers (gateway keys are never
  forwarded: test_auth.py, test_keys_file.py);
* ``usage_upstream`` and ``limited_post``: an answer that reports ``USED`` tokens, and a
  request with the rate-limited key ``SECRET`` (test_ratelimit.py, test_redis_limits.py).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

# Each key's models, as the upstream sends them (created/owned_by are its own).
MODELS_BY_KEY = {
    "Bearer sk-caller-a": [{"id": "model-a", "object": "model", "created": 1700000001,
                            "owned_by": "org-a"}],
    "Bearer sk-caller-b": [{"id": "model-b1", "object": "model", "created": 1700000002,
                            "owned_by": "org-b"},
                           {"id": "model-b2", "object": "model", "created": 1700000003,
                            "owned_by": "org-b"}],
}


def keyed_upstream(seen: list[str | None]) -> web.Application:
    """``/v1/models`` answering each key in ``MODELS_BY_KEY`` its own list."""
    async def models(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        seen.append(auth)
        if auth not in MODELS_BY_KEY:
            error = {"message": "bad key", "type": "invalid_request_error",
                     "code": "invalid_api_key"}
            return web.json_response({"error": error}, status=401)
        return web.json_response({"object": "list", "data": MODELS_BY_KEY[auth]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    return app


MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


Seen = list[CIMultiDictProxy[str]]


def headers_upstream(seen: Seen) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        seen.append(request.headers)
        body = await request.json()
        return web.json_response({"id": "c1", "object": "chat.completion", "created": 0,
                                  "model": body["model"], "choices": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


SECRET = "sk-gw-limited-key-for-tests"


USED = 20


def usage_upstream(calls: list[dict[str, Any]]) -> web.Application:
    """Answers with ``usage.total_tokens`` = ``USED``, as JSON or as SSE with a final
    usage chunk."""
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        calls.append(body)
        usage = {"prompt_tokens": 5, "completion_tokens": USED - 5, "total_tokens": USED}
        if not body.get("stream"):
            return web.json_response({"id": "c", "object": "chat.completion", "created": 0,
                                      "model": "m", "choices": [], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        final = {**chunk, "choices": [], "usage": usage}
        await response.write(b"data: " + orjson.dumps(final) + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def limited_post(session: aiohttp.ClientSession, base: str, **fields: Any
               ) -> tuple[int, dict[str, str], bytes]:
    async with session.post(f"{base}/v1/chat/completions",
                            headers={"Authorization": f"Bearer {SECRET}"},
                            json={"model": "m", "messages": MESSAGES, **fields}) as response:
        return response.status, dict(response.headers), await response.read()
