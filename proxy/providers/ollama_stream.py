"""Ollama answers translated into OpenAI's, as they arrive.

Ollama streams NDJSON: one JSON object per line, the last with ``"done": true``. Each
line becomes one OpenAI ``chat.completion.chunk`` (or ``text_completion``) SSE event, in
the order OpenAI sends them: a role chunk, content deltas, a chunk with
``finish_reason``, an optional usage chunk, then ``data: [DONE]``. A stream that ends
without ``done`` or carries an ``error`` line raises, so the relay ends it with an SSE
``error`` event instead of ``[DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from proxy.call import Call
from proxy.errors import UpstreamError, UpstreamProtocolError
from proxy.errors import error_body as openai_error

_DONE = b"data: [DONE]\n\n"
_FINISH = {"stop": "stop", "length": "length", "load": "stop", "unload": "stop"}


async def translate(call: Call, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if not call.stream or call.endpoint == "embeddings":
        yield orjson.dumps(_whole_answer(call, _parse(await _collect(chunks))))
        return
    async for event in _events(call, _lines(chunks)):
        yield event


def error_body(status: int, body: bytes) -> bytes:
    """Ollama's ``{"error": "..."}`` in OpenAI's shape; OpenAI-shaped bodies pass."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return body
    message = parsed.get("error") if isinstance(parsed, dict) else None
    text = str(message) if message else f"Ollama answered with HTTP {status}"
    if status == 404:
        return orjson.dumps(openai_error(text, "invalid_request_error", "model_not_found",
                                         "model"))
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return orjson.dumps(openai_error(text, kind))


def _whole_answer(call: Call, answer: dict[str, Any]) -> dict[str, Any]:
    if call.endpoint == "embeddings":
        return _embeddings(call, answer)
    usage = _usage(answer)
    if call.endpoint == "completions":
        choice: dict[str, Any] = {"index": 0, "text": answer.get("response", ""),
                                  "logprobs": None, "finish_reason": _finish(answer, False)}
        return _envelope(call, "text_completion", [choice], usage)
    message = answer.get("message") or {}
    calls = _tool_calls(message)
    reply: dict[str, Any] = {"role": "assistant", "content": message.get("content", "")}
    if calls:
        reply["tool_calls"] = calls
    choice = {"index": 0, "message": reply, "finish_reason": _finish(answer, bool(calls))}
    return _envelope(call, "chat.completion", [choice], usage)


def _embeddings(call: Call, answer: dict[str, Any]) -> dict[str, Any]:
    vectors = answer.get("embeddings") or []
    tokens = answer.get("prompt_eval_count", 0)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": vector}
                 for i, vector in enumerate(vectors)],
        "model": call.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def _events(call: Call, lines: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    chat = call.endpoint == "chat/completions"
    kind = "chat.completion.chunk" if chat else "text_completion"
    started = False
    async for line in lines:
        if chat and not started:
            started = True
            yield _sse(_envelope(call, kind, [_delta({"role": "assistant", "content": ""})]))
        message = line.get("message") or {}
        text = message.get("content", "") if chat else line.get("response", "")
        calls = _tool_calls(message) if chat else []
        if text or calls:
            delta = {"content": text} if chat else {"text": text}
            if calls:
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
            yield _sse(_envelope(call, kind, [_delta(delta, chat)]))
        if line.get("done"):
            yield _sse(_envelope(call, kind, [_delta({} if chat else {"text": ""}, chat,
                                                     _finish(line, bool(calls)))]))
            if _wants_usage(call):
                yield _sse(_envelope(call, kind, [], _usage(line)))
            yield _DONE
            return
    raise UpstreamProtocolError("Ollama's stream ended before it reported done")


def _delta(delta: dict[str, Any], chat: bool = True, finish: str | None = None
           ) -> dict[str, Any]:
    if chat:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": 0, **delta, "logprobs": None, "finish_reason": finish}


def _envelope(call: Call, kind: str, choices: list[dict[str, Any]],
              usage: dict[str, int] | None = None) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    out: dict[str, Any] = {"id": f"{prefix}-{call.request_id}", "object": kind,
                           "created": int(time.time()), "model": call.model,
                           "choices": choices}
    if usage is not None:
        out["usage"] = usage
    return out


def _tool_calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return []
    out = []
    for i, call in enumerate(calls):
        function = call.get("function", {}) if isinstance(call, dict) else {}
        arguments = function.get("arguments", {})
        out.append({"id": f"call_{i}", "type": "function", "function": {
            "name": function.get("name", ""),
            "arguments": arguments if isinstance(arguments, str) else
            orjson.dumps(arguments).decode()}})
    return out


def _finish(answer: dict[str, Any], tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return _FINISH.get(str(answer.get("done_reason", "stop")), "stop")


def _usage(answer: dict[str, Any]) -> dict[str, int]:
    prompt = int(answer.get("prompt_eval_count") or 0)
    completion = int(answer.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _wants_usage(call: Call) -> bool:
    options = (call.payload or {}).get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


async def _collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def _parse(body: bytes) -> dict[str, Any]:
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise UpstreamProtocolError("Ollama sent an answer that is not JSON") from None
    if not isinstance(answer, dict):
        raise UpstreamProtocolError("Ollama sent an answer that is not a JSON object")
    if answer.get("error"):
        raise UpstreamError(f"Ollama: {answer['error']}")
    return answer


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """NDJSON objects, whatever the chunk boundaries."""
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                yield _parse(line)
    if pending.strip():
        yield _parse(pending)
