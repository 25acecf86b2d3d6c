"""An aiohttp upstream with one base URL per fault, for tests that run the gateway as a
real process (tests/test_faults.py, tests/test_secrets_process.py).

``/<kind>/v1/chat/completions``, one provider per kind (its model is ``<kind>-m``):

* ``ok``: a chat completion, or a three-event stream ending in ``[DONE]``;
* ``hang``: reads the request and never answers;
* ``drop``: two SSE events, then the connection is cut (no ``[DONE]``, no terminator);
* ``endless``: an SSE event every 3 s, and records when its handler is cancelled;
* ``flaky``: 429 with ``Retry-After: 1`` first, then 200; records each call's time.

A ``dead`` provider points at a refused port. Every request's ``Authorization`` is kept,
so a test can check which key went upstream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import orjson
from aiohttp import web

KINDS = ("ok", "hang", "drop", "endless", "flaky")
CHAT = "/v1/chat/completions"
ENDLESS_GAP = 3.0  # longer than the 1 s a cancellation may take: no write reveals it


def event(text: str) -> bytes:
    chunk = {"id": "chatcmpl-f", "object": "chat.completion.chunk", "created": 0,
             "model": "m", "choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


ANSWER = {"id": "chatcmpl-ok", "object": "chat.completion", "created": 0, "model": "m",
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": "fine"}}]}


@dataclasses.dataclass
class Faults:
    """What the upstream saw; ``app`` serves it."""

    calls: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {kind: [] for kind in KINDS})
    authorizations: list[str] = dataclasses.field(default_factory=list)
    endless_started: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    endless_cancelled: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    cancelled_at: float = 0.0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{kind}" + CHAT, self._chat)
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        body = await request.json()
        self.calls[kind].append(time.monotonic())
        self.authorizations.append(request.headers.get("Authorization", ""))
        if kind == "hang":
            await asyncio.sleep(3600)
        if kind == "flaky" and len(self.calls[kind]) == 1:
            return web.json_response({"error": {"message": "slow down", "type": "x",
                                                "param": None, "code": None}},
                                     status=429, headers={"Retry-After": "1"})
        if kind in {"drop", "endless"} or body.get("stream"):
            return await self._stream(request, kind)
        return web.json_response(ANSWER)

    async def _stream(self, request: web.Request, kind: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if kind == "endless":
            return await self._endless(response)
        for text in ("one", "two"):
            await response.write(event(text))
        if kind == "drop":
            assert request.transport is not None
            request.transport.abort()  # as a crashed upstream: mid-body, unterminated
            return response
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _endless(self, response: web.StreamResponse) -> web.StreamResponse:
        self.endless_started.set()
        try:
            for _ in range(100):
                await response.write(event("tick"))
                await asyncio.sleep(ENDLESS_GAP)
        except asyncio.CancelledError:
            self.cancelled_at = time.monotonic()
            self.endless_cancelled.set()
            raise
        return response


def providers(upstream: str, dead_port: int, **extra: Any) -> list[dict[str, Any]]:
    """One provider per kind at ``upstream`` (the server's root URL), plus ``dead``."""
    listed = [{"name": kind, "type": "openai_compat", "base_url": f"{upstream}/{kind}/v1",
               "models": [f"{kind}-m"], **extra} for kind in KINDS]
    return [*listed, {"name": "dead", "type": "openai_compat", "models": ["dead-m"],
                      "base_url": f"http://127.0.0.1:{dead_port}/v1", **extra}]


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
