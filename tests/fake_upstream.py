"""One counting fake upstream for the tests (issue 11, "one shared counting fake upstream"):
a real aiohttp app on loopback serving OpenAI-shaped ``/v1/chat/completions`` (JSON or
SSE), ``/v1/completions``, ``/v1/embeddings`` and ``/v1/models``.

What it answers is scripted per path by a mutable :class:`Reply` (``fake.chat``,
``fake.completions``, ``fake.embeddings``, ``fake.models``): status, latency before the
head (and before the body: a slow body), body, headers,
the streamed pieces and the time between them, a gate the answer waits on. A test that
needs more sets ``fake.hook``: called with each request, it may return a ``Reply`` for
that request alone, or write and return a response itself (still counted and recorded).

What it was asked is kept: ``calls`` counts requests per path, ``requests`` the last
``KEEP`` requests (method, path, headers, body, arrival time), ``inflight``/``most_inflight`` the
requests being answered. Answers are numbered by call (``answer-3``, ``chatcmpl-3``,
``X-Request-ID: upstream-3``), so a test tells a shared or cached answer from a fresh one.
The ``fake_upstream`` and ``start_fake`` fixtures (conftest.py) start it on a free port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
MODELS = "/v1/models"
KEEP = 100  # requests kept in ``requests``: enough for any one test, bounded for bursts
DONE = b"data: [DONE]\n\n"


@dataclass
class Reply:
    """How one path answers. ``body`` replaces the default answer (a dict is sent as
    JSON, bytes as they are, a callable gets the call number); ``pieces`` are the
    streamed deltas, each sent ``interval`` after the one before (the first ``interval``
    after the head), ``events`` whole SSE events instead of them; ``usage`` goes in the
    answer, or in a last chunk of a stream; ``gate``, when set, holds the answer (bounded):
    a JSON answer whole, a stream after its head; ``pad`` adds a ``"pad"`` of that many
    bytes to each answer and chunk; ``body_latency`` holds a JSON answer's body that long
    after its head (an upstream slow to send its body)."""

    status: int = 200
    latency: float = 0.0
    body: dict[str, Any] | bytes | Callable[[int], dict[str, Any] | bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    pieces: tuple[str, ...] = ("one", " two", " three")
    events: tuple[bytes, ...] | None = None
    interval: float = 0.0
    usage: dict[str, int] | None = None
    gate: asyncio.Event | None = None
    pad: int = 0
    body_latency: float = 0.0


@dataclass(frozen=True)
class Seen:
    """One request as it arrived."""

    method: str
    path: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    call: int  # its number among the calls to its path, from 1
    at: float = field(default_factory=time.monotonic)  # when it arrived (monotonic)

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


Hook = Callable[[web.Request, Seen], Awaitable["Reply | web.StreamResponse | None"]]


class FakeUpstream:
    """One fake provider: ``models`` are what ``/v1/models`` lists (and the config entry
    of ``provider()``), ``chat`` the fields of the chat path's first ``Reply``."""

    def __init__(self, models: tuple[str, ...] = ("m",), **chat: Any):
        self.model_ids = list(models)
        self.chat = Reply(**chat)
        self.completions = Reply()
        self.embeddings = Reply()
        self.models = Reply()
        self.hook: Hook | None = None
        self.calls: Counter[str] = Counter()
        self.requests: deque[Seen] = deque(maxlen=KEEP)
        self.inflight = 0
        self.most_inflight = 0
        self.cancelled = 0  # answers the gateway gave up on while they were written
        self.written_at: list[float] = []  # when each streamed event went out (monotonic)
        self.url = ""  # base URL including /v1, once started

    def __repr__(self) -> str:
        return (f"<FakeUpstream {self.url} calls={dict(self.calls)} "
                f"inflight={self.inflight}>")

    @property
    def chats(self) -> int:
        """Chat completion calls so far: what most tests count."""
        return self.calls[CHAT]

    def bodies(self, path: str = CHAT) -> list[Any]:
        """The JSON bodies of the kept requests to ``path``, oldest first."""
        return [seen.json() for seen in self.requests if seen.path == path]

    def headers(self, path: str | None = CHAT) -> list[CIMultiDict[str]]:
        """The headers of the kept requests to ``path`` (``None``: every path)."""
        return [seen.headers for seen in self.requests if path in (None, seen.path)]

    def provider(self, name: str = "up", discover: bool = False, **extra: Any
                 ) -> dict[str, Any]:
        """A config entry for this upstream: its static model list, or with ``discover``
        none, so the gateway asks ``/v1/models`` (whose ``model_ids`` a test may change)."""
        listed = {} if discover else {"models": self.model_ids}
        return {"name": name, "type": "openai_compat", "base_url": self.url,
                **listed, **extra}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(CHAT, self._handle)
        app.router.add_post(COMPLETIONS, self._handle)
        app.router.add_post(EMBEDDINGS, self._handle)
        app.router.add_get(MODELS, self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.calls[request.path] += 1
        seen = Seen(request.method, request.path, request.path_qs,
                    request.headers.copy(), body, self.calls[request.path])
        self.requests.append(seen)
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        try:
            return await self._answer(request, seen)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        finally:
            self.inflight -= 1

    async def _answer(self, request: web.Request, seen: Seen) -> web.StreamResponse:
        reply = {CHAT: self.chat, COMPLETIONS: self.completions, EMBEDDINGS: self.embeddings,
                 MODELS: self.models}[seen.path]
        if self.hook is not None:
            chosen = await self.hook(request, seen)
            if isinstance(chosen, web.StreamResponse):
                return chosen
            reply = chosen or reply
        await asyncio.sleep(reply.latency)
        headers = {"X-Request-ID": f"upstream-{seen.call}", **reply.headers}
        asked = seen.json() if seen.path != MODELS else None
        if reply.status == 200 and isinstance(asked, dict) and asked.get("stream"):
            return await self._stream(request, reply, seen, headers)
        await _opened(reply.gate)
        body = self._body(reply, seen, asked)
        headers = {"Content-Type": "application/json", **headers}
        if not reply.body_latency:
            return web.Response(status=reply.status, body=body, headers=headers)
        response = web.StreamResponse(status=reply.status, headers=headers)
        response.content_length = len(body)
        await response.prepare(request)
        await asyncio.sleep(reply.body_latency)
        await response.write(body)
        await response.write_eof()
        return response

    def _body(self, reply: Reply, seen: Seen, asked: Any) -> bytes:
        body = reply.body(seen.call) if callable(reply.body) else reply.body
        if body is None:
            body = self._default(reply, seen, asked)
        return body if isinstance(body, bytes) else orjson.dumps(body)

    def _default(self, reply: Reply, seen: Seen, asked: Any) -> dict[str, Any]:
        if reply.status != 200:
            return {"error": {"message": f"failure {seen.call}", "type": "upstream_error",
                              "param": None, "code": None}}
        if seen.path == MODELS:
            return {"object": "list", "data": [
                {"id": m, "object": "model", "created": 1, "owned_by": "fake"}
                for m in self.model_ids]}
        model = asked.get("model", "") if isinstance(asked, dict) else ""
        answer: dict[str, Any]
        if seen.path == COMPLETIONS:
            answer = {"id": f"answer-{seen.call}", "object": "text_completion",
                      "created": 0, "model": model, "choices": [{
                          "index": 0, "finish_reason": "stop", "logprobs": None,
                          "text": "".join(reply.pieces)}]}
        elif seen.path == EMBEDDINGS:
            inputs = asked.get("input", []) if isinstance(asked, dict) else []
            count = len(inputs) if isinstance(inputs, list) else 1
            answer = {"object": "list", "model": model, "data": [
                {"object": "embedding", "index": i, "embedding": [0.0, 1.0]}
                for i in range(count)]}
        else:
            answer = {"id": f"answer-{seen.call}", "object": "chat.completion",
                      "created": 0, "model": model, "choices": [{
                          "index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant",
                                      "content": "".join(reply.pieces)}}]}
        if reply.usage is not None:
            answer["usage"] = reply.usage
        if reply.pad:
            answer["pad"] = "x" * reply.pad
        return answer

    async def _stream(self, request: web.Request, reply: Reply, seen: Seen,
                      headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        await _opened(reply.gate)
        events = reply.events if reply.events is not None else self._events(reply, seen)
        for event in events:
            if event != DONE:  # which follows the last event at once
                await asyncio.sleep(reply.interval)
            await response.write(event)
            self.written_at.append(time.monotonic())
        await response.write_eof()
        return response

    def _events(self, reply: Reply, seen: Seen) -> tuple[bytes, ...]:
        """The default stream: one chunk per piece, a usage chunk if any, ``[DONE]``."""
        chunk: dict[str, Any] = {"id": f"chatcmpl-{seen.call}",
                                 "object": "chat.completion.chunk", "created": 1,
                                 "model": (seen.json() or {}).get("model", "")}
        if reply.pad:
            chunk["pad"] = "x" * reply.pad
        events = [sse({**chunk, "choices": [{"index": 0, "delta": {"content": piece},
                                             "finish_reason": None}]})
                  for piece in reply.pieces]
        if reply.usage is not None:
            events.append(sse({**chunk, "choices": [], "usage": reply.usage}))
        return (*events, DONE)


async def _opened(gate: asyncio.Event | None) -> None:
    if gate is not None:
        await asyncio.wait_for(gate.wait(), 20)


def sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def replaced(reply: Reply, **changes: Any) -> Reply:
    """A copy of ``reply`` with ``changes`` (for a hook's one-off answer)."""
    return dataclasses.replace(reply, **changes)
