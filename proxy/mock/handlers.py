"""The mock upstream's endpoints and the two ways they answer: one JSON body, or SSE events.

Every inference handler reads top to bottom the same way: :meth:`MockUpstream.begin`
(script, latency, failures, body), pick the text, then answer buffered or streamed.
Errors are raised as :class:`~proxy.mock.script.MockError` and rendered by the middleware
in :mod:`proxy.mock.server`, so no handler builds an error response itself.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from typing import Any

import orjson
from aiohttp import web

from proxy.mock import payloads
from proxy.mock.script import (
    MockError,
    MockOptions,
    Plan,
    injected_failure,
    plan_for,
    scripted_failure,
)

_CREATED = 1700000000
"""``created`` of every model object: fixed so ``/v1/models`` is byte-identical across runs."""


# --- reading bodies ---------------------------------------------------------------------


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MockError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MockError(400, "request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MockError(400, "you must provide a model parameter", param="model")
    return model


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# --- writing answers --------------------------------------------------------------------


def json_response(body: bytes) -> web.Response:
    """A 200 JSON answer from bytes already rendered."""
    return web.Response(body=body, content_type="application/json")


def _drop_connection(request: web.Request) -> None:
    """Cut the connection the way a crashed upstream would: mid-body and unterminated.

    ``abort()`` discards bytes still queued in the transport, so if any are (a slow
    reader) ``close()`` flushes them first: the client gets exactly the chunks promised.
    """
    transport = request.transport
    if transport is None:
        return
    if transport.get_write_buffer_size():
        transport.close()
    else:
        transport.abort()


def _answer(request: web.Request, plan: Plan, payload: payloads.Json) -> web.Response:
    """A non-streamed JSON answer, or a dropped connection if the request scripted one.

    After a drop the returned response is never written: aiohttp finds the transport
    closed and gives up quietly.
    """
    if plan.disconnect_after is not None:
        _drop_connection(request)
        return web.Response()
    return json_response(orjson.dumps(payload))


async def _stream(
    request: web.Request, plan: Plan, script: payloads.SseScript
) -> web.StreamResponse:
    """Write a streamed answer, one ``write`` per event as real upstreams flush per token.

    Content events are paced by ``plan.interval``; ``plan.disconnect_after`` cuts the
    connection after that many content events, before the stop chunk and ``[DONE]``.
    """
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    await response.prepare(request)
    for event in script.head:
        await response.write(event)
    cut = plan.disconnect_after
    for index, event in enumerate(script.body if cut is None else script.body[:cut]):
        if index and plan.interval:
            await asyncio.sleep(plan.interval)
        await response.write(event)
    if cut is not None:
        _drop_connection(request)
        return response
    for event in script.tail:
        await response.write(event)
    await response.write_eof()
    return response


# --- endpoints --------------------------------------------------------------------------


class MockUpstream:
    """The endpoints, sharing one seeded RNG, one id counter and the pre-rendered bodies."""

    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self._rng = random.Random(options.seed)
        self._ids = itertools.count(1)
        self._default_plan = Plan.default(options)
        objects = [
            {"id": m, "object": "model", "created": _CREATED, "owned_by": "mock"}
            for m in options.models
        ]
        self._model_list = orjson.dumps({"object": "list", "data": objects})
        self._model_bodies = {obj["id"]: orjson.dumps(obj) for obj in objects}

    def __repr__(self) -> str:
        return f"<MockUpstream models={list(self.options.models)} {self._ids!r}>"

    def _next(self, prefix: str, body: dict[str, Any], user: str, prompt: str) -> payloads.Answer:
        """The answer to one request: a fresh id, the echoed text and word-count usage."""
        text = payloads.answer_for(user)
        ident = f"{prefix}{next(self._ids)}"
        counts = payloads.usage(prompt, text)
        return payloads.Answer(ident, int(time.time()), _model(body), text, counts)

    async def list_models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: constant bytes, so model listing costs nothing in benchmarks."""
        return json_response(self._model_list)

    async def get_model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}``: one model object, or OpenAI's 404."""
        model = request.match_info["model"]
        body = self._model_bodies.get(model)
        if body is None:
            message = f"The model '{model}' does not exist"
            raise MockError(404, message, code="model_not_found", param="model")
        return json_response(body)

    async def begin(self, request: web.Request) -> tuple[Plan, dict[str, Any]]:
        """The steps every inference endpoint shares, in the order a real upstream shows them.

        Bad ``X-Mock-*`` headers fail at once; then the wait before the first byte; then a
        scripted or injected failure; only then is the body validated.
        """
        plan = plan_for(request.headers, self._default_plan)
        raw = await request.read()
        if plan.latency:
            await asyncio.sleep(plan.latency)
        if plan.status is not None:
            raise scripted_failure(plan.status)
        rate = self.options.error_rate
        if rate and self._rng.random() < rate:
            raise injected_failure()
        return plan, _parse_object(raw)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``, streamed or not."""
        plan, body = await self.begin(request)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise MockError(400, "'messages' must be an array", param="messages")
        user = payloads.last_user_text(messages)
        answer = self._next("chatcmpl-mock-", body, user, payloads.all_text(messages))
        if body.get("stream") is True:
            script = payloads.chat_stream(answer, plan.chunks, _include_usage(body))
            return await _stream(request, plan, script)
        return _answer(request, plan, payloads.chat_completion(answer))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/completions`` (legacy), streamed or not."""
        plan, body = await self.begin(request)
        prompt = payloads.prompt_text(body.get("prompt"))
        answer = self._next("cmpl-mock-", body, prompt, prompt)
        if body.get("stream") is True:
            script = payloads.completion_stream(answer, plan.chunks, _include_usage(body))
            return await _stream(request, plan, script)
        return _answer(request, plan, payloads.text_completion(answer))

    async def embeddings(self, request: web.Request) -> web.Response:
        """``POST /v1/embeddings``, float or base64 (the openai SDK asks for base64)."""
        plan, body = await self.begin(request)
        model = _model(body)
        inputs = payloads.embedding_inputs(body.get("input"))
        if inputs is None:
            message = "'input' must be a string, an array of strings or an array of token arrays"
            raise MockError(400, message, param="input")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            message = "'encoding_format' must be 'float' or 'base64'"
            raise MockError(400, message, param="encoding_format")
        dim = self.options.embedding_dim
        payload = payloads.embeddings(model, inputs, dim, as_base64=encoding == "base64")
        return _answer(request, plan, payload)

    async def responses(self, request: web.Request) -> web.Response:
        """``POST /v1/responses``, non-streamed only: enough for pass-through tests."""
        plan, body = await self.begin(request)
        if body.get("stream") is True:
            message = "streaming not supported by the mock for /v1/responses"
            raise MockError(400, message, param="stream")
        given = body.get("input")
        items = given if isinstance(given, list) else []
        user = given if isinstance(given, str) else payloads.last_user_text(items)
        instructions = body.get("instructions")
        prompt = given if isinstance(given, str) else payloads.all_text(items)
        if isinstance(instructions, str):
            prompt = f"{instructions} {prompt}"
        answer = self._next("resp_mock_", body, user, prompt)
        return _answer(request, plan, payloads.response_object(answer))
