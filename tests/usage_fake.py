"""An OpenAI-like upstream for the usage tests (tests/test_usage*.py): deterministic
bytes (fixed ids and times), and ``stream_options.include_usage`` honoured exactly as
OpenAI does: every chunk gains ``"usage":null`` and one last chunk with empty
``choices`` carries the usage, just before ``data: [DONE]``.

Per request, headers script the stream: ``X-Test-End`` ``complete`` (default), ``cut``
(the connection is aborted after the first three events) or ``stall`` (no byte after
them: the gateway's read deadline ends it), ``X-Test-Split`` writes the body in pieces
of that many bytes (``length``: all at once, with a Content-Length), ``X-Test-Null``
``middle`` puts ``"usage":null`` before ``choices`` (the bench mock's order) instead of
last, ``X-Test-Delay`` waits that many seconds before the answer's head (so identical
requests meet in flight). Every request body is kept in ``bodies``.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import orjson
from aiohttp import web

USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
         "prompt_tokens_details": {"cached_tokens": 3},
         "completion_tokens_details": {"reasoning_tokens": 2}}
RESPONSES_USAGE = {"input_tokens": 5, "output_tokens": 4, "total_tokens": 9,
                   "input_tokens_details": {"cached_tokens": 1},
                   "output_tokens_details": {"reasoning_tokens": 0}}
EMBEDDING_USAGE = {"prompt_tokens": 6, "total_tokens": 6}
WORDS = ("Hel", "lo", " the", "re", "!")
STALL = 10.0  # seconds a stalled stream waits (the gateway's deadline is far shorter)


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def chat_events(include_usage: bool, null_first: bool = False) -> list[bytes]:
    """The stream, event by event: a role chunk, ``WORDS``, a stop chunk, [usage], DONE."""
    meta: dict[str, Any] = {"id": "chatcmpl-u1", "object": "chat.completion.chunk",
                            "created": 1700000000, "model": "m",
                            "system_fingerprint": "fp_u"}
    if include_usage and null_first:
        meta["usage"] = None
    end = {"usage": None} if include_usage and not null_first else {}

    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**meta, "choices": [choice], **end})

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": word}, None) for word in WORDS]
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(sse({**meta, "choices": [], "usage": USAGE}))
    return [*events, b"data: [DONE]\n\n"]


@dataclasses.dataclass
class UsageUpstream:
    bodies: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/embeddings", self._embeddings)
        return app

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if body.get("stream") is not True:
            message = {"role": "assistant", "content": "".join(WORDS)}
            return web.json_response({
                "id": "chatcmpl-u0", "object": "chat.completion", "created": 1700000000,
                "model": "m", "choices": [{"index": 0, "message": message,
                                           "finish_reason": "stop"}], "usage": USAGE})
        options = body.get("stream_options") or {}
        events = chat_events(options.get("include_usage") is True,
                             request.headers.get("X-Test-Null") == "middle")
        return await _stream(request, events)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        response: dict[str, object] = {
            "id": "resp_u", "object": "response", "status": "completed", "model": "m",
            "output": [], "usage": RESPONSES_USAGE, "user": None, "metadata": {}}
        if body.get("stream") is not True:
            return web.json_response(response)
        created = {**response, "status": "in_progress", "usage": None}
        events = [sse({"type": "response.created", "response": created}),
                  sse({"type": "response.output_text.delta", "delta": "Hi"}),
                  sse({"type": "response.completed", "response": response})]
        return await _stream(request, events)

    async def _embeddings(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.json_response({"object": "list", "model": "m", "usage": EMBEDDING_USAGE,
                                  "data": [{"object": "embedding", "index": 0,
                                            "embedding": [0.5, 0.25]}]})


async def _stream(request: web.Request, events: list[bytes]) -> web.StreamResponse:
    end = request.headers.get("X-Test-End", "complete")
    if request.headers.get("X-Test-Split") == "length":  # one body with a Content-Length
        return web.Response(body=b"".join(events), content_type="text/event-stream")
    split = int(request.headers.get("X-Test-Split", "0"))
    await asyncio.sleep(float(request.headers.get("X-Test-Delay", "0")))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if end != "complete":
        events = events[:3]
    data = b"".join(events)
    pieces = [data[i:i + split] for i in range(0, len(data), split)] if split else events
    for piece in pieces:
        await response.write(piece)
        if split:
            await asyncio.sleep(0)
    if end == "cut":
        await asyncio.sleep(0.05)  # the events reach the gateway before the cut
        assert request.transport is not None
        request.transport.abort()
        return response
    if end == "stall":
        await asyncio.sleep(STALL)
    await response.write_eof()
    return response
