"""A fake Ollama (``/api/tags``, ``/api/chat``, ``/api/generate``, ``/api/embed``) for
the Ollama provider's tests (tests/test_ollama.py, test_usage_shared.py): newline-
delimited JSON streamed piece by piece, scripted by the test, every request kept."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

MODEL = "llama3.2:1b"


USAGE = {"prompt_eval_count": 5, "eval_count": 7}


VECTORS = [[0.25, -0.5, 1.0], [0.125, 0.0, -2.0]]


@dataclass
class FakeOllama:
    """Ollama's ``/api/*`` endpoints, scripted by the test: the answer is ``pieces``
    (streamed one per line, ``interval`` apart), then ``tail``: ``done`` (the final line),
    ``cut`` (close without it) or ``error`` (an ``{"error"}`` line)."""

    pieces: list[str] = field(default_factory=lambda: ["Hel", "lo", " world"])
    interval: float = 0.0
    tail: str = "done"
    tool_calls: list[dict[str, Any]] | None = None
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/api/chat", self._answer)
        app.router.add_post("/api/generate", self._answer)
        app.router.add_post("/api/embed", self._embed)
        return app

    async def _tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [
            {"name": MODEL, "model": MODEL, "size": 1, "digest": "abc", "details": {}}]})

    def _line(self, path: str, text: str, **extra: Any) -> dict[str, Any]:
        line: dict[str, Any] = {"model": MODEL, "created_at": "2024-01-01T00:00:00Z", **extra}
        if path == "/api/chat":
            line["message"] = {"role": "assistant", "content": text}
        else:
            line["response"] = text
        return line

    def _final(self, path: str, text: str) -> dict[str, Any]:
        final = self._line(path, text, done=True, done_reason="stop", **USAGE)
        if self.tool_calls is not None:
            final["message"]["tool_calls"] = self.tool_calls
        return final

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append((request.path, body))
        if body["model"] != MODEL:
            return web.json_response(
                {"error": f'model "{body["model"]}" not found, try pulling it first'},
                status=404)
        if not body.get("stream", True):
            return web.json_response(self._final(request.path, "".join(self.pieces)))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        lines = [self._line(request.path, p, done=False) for p in self.pieces]
        lines += {"done": [self._final(request.path, "")], "cut": [],
                  "error": [{"error": "the model runner crashed"}]}[self.tail]
        for index, line in enumerate(lines):
            if index:
                await asyncio.sleep(self.interval)
            await response.write(orjson.dumps(line) + b"\n")
        await response.write_eof()
        return response

    async def _embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.received.append((request.path, body))
        return web.json_response({"model": MODEL, "embeddings": VECTORS,
                                  "prompt_eval_count": 4})
