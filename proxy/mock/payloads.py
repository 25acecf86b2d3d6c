"""OpenAI-shaped bodies for the mock upstream, built from plain request data.

Kept apart from the HTTP wiring in :mod:`proxy.mock.server` so the shapes can be read (and
unit tested) without a server and the handlers stay short. Nothing here does I/O, and
everything is deterministic: the same request always yields the same text and vectors,
so tests can assert on exact values and caches in the gateway see stable answers.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson

GREETING = "Hello from the mock upstream! You said: "
ECHO_LIMIT = 200
"""Characters of the user's text echoed back; long prompts must not make long answers."""

DONE_EVENT = b"data: [DONE]\n\n"

Json = dict[str, Any]


# --- errors -----------------------------------------------------------------------------

# (type, code) per status, as real OpenAI labels them; anything unlisted falls back by class.
_STATUS_LABELS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    """The one error shape OpenAI uses everywhere, so gateway error mapping sees real input."""
    error = {"message": message, "type": type_, "param": param, "code": code}
    return orjson.dumps({"error": error})


def status_labels(status: int) -> tuple[str, str | None]:
    """The ``(type, code)`` pair OpenAI would attach to an error with this HTTP status."""
    if status in _STATUS_LABELS:
        return _STATUS_LABELS[status]
    return ("server_error", None) if status >= 500 else ("invalid_request_error", None)


# --- reading requests -------------------------------------------------------------------


def text_of(content: object) -> str:
    """Flatten a message ``content`` (a string, a list of parts, or absent) to plain text.

    Parts without a string ``text`` (images, audio) are skipped: the mock only echoes text.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict)]
        return " ".join(p["text"] for p in parts if isinstance(p.get("text"), str))
    return ""


def last_user_text(messages: list[Any]) -> str:
    """Text of the last ``user`` message; also reads Responses API input items."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def all_text(messages: list[Any]) -> str:
    """Every message's text joined, the base for the rough prompt token count."""
    return " ".join(text_of(m.get("content")) for m in messages if isinstance(m, dict))


def prompt_text(prompt: object) -> str:
    """Text of a legacy ``/v1/completions`` prompt: a string, strings, or token arrays."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if all(isinstance(p, str) for p in prompt):
            return " ".join(prompt)
        return f"[{len(prompt)} tokens]"
    return ""


def answer_for(user_text: str) -> str:
    """The deterministic assistant answer: a greeting plus the (truncated) user text."""
    return GREETING + user_text[:ECHO_LIMIT]


def usage(prompt: str, completion: str) -> Json:
    """Chat/completions usage with word counts standing in for tokens (no tokenizer needed)."""
    prompt_tokens, completion_tokens = len(prompt.split()), len(completion.split())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def split_text(text: str, parts: int) -> list[str]:
    """Cut ``text`` into exactly ``parts`` pieces of near-equal length (some may be empty)."""
    size = len(text)
    return [text[i * size // parts : (i + 1) * size // parts] for i in range(parts)]


# --- answers ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """What one answer says, whatever the endpoint's shape: ids, model, text and usage."""

    ident: str
    created: int
    model: str
    text: str
    counts: Json


@dataclass(frozen=True, slots=True)
class SseScript:
    """A streamed answer, pre-rendered: events before, between and after the content deltas.

    Splitting it this way lets one writer pace ``body`` and cut the connection inside it.
    """

    head: list[bytes]
    body: list[bytes]
    tail: list[bytes]


def sse(payload: Json) -> bytes:
    """One server-sent event, framed exactly as OpenAI frames it (no ``event:`` line)."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _meta(answer: Answer, object_: str) -> Json:
    return {"id": answer.ident, "object": object_, "created": answer.created, "model": answer.model}


def _stream_tail(meta: Json, stop: bytes, answer: Answer, include_usage: bool) -> list[bytes]:
    tail = [stop]
    if include_usage:
        tail.append(sse({**meta, "choices": [], "usage": answer.counts}))
    tail.append(DONE_EVENT)
    return tail


def chat_completion(answer: Answer) -> Json:
    """A non-streamed ``chat.completion`` object."""
    message = {"role": "assistant", "content": answer.text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    return {**_meta(answer, "chat.completion"), "choices": [choice], "usage": answer.counts}


def chat_stream(answer: Answer, chunks: int, include_usage: bool) -> SseScript:
    """A streamed chat answer: role delta, ``chunks`` content deltas, stop, usage, ``[DONE]``.

    As in the real API, when usage was asked for every chunk carries ``"usage": null`` and
    only the extra last chunk (with empty ``choices``) carries the numbers.
    """
    meta = _meta(answer, "chat.completion.chunk")
    if include_usage:
        meta["usage"] = None

    def event(delta: Json, finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**meta, "choices": [choice]})

    return SseScript(
        head=[event({"role": "assistant", "content": ""}, None)],
        body=[event({"content": piece}, None) for piece in split_text(answer.text, chunks)],
        tail=_stream_tail(meta, event({}, "stop"), answer, include_usage),
    )


def text_completion(answer: Answer) -> Json:
    """A non-streamed legacy ``text_completion`` object."""
    choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": "stop"}
    return {**_meta(answer, "text_completion"), "choices": [choice], "usage": answer.counts}


def completion_stream(answer: Answer, chunks: int, include_usage: bool) -> SseScript:
    """A streamed legacy completion: ``chunks`` text pieces, a stop chunk, usage, ``[DONE]``."""
    meta = _meta(answer, "text_completion")

    def event(piece: str, finish: str | None) -> bytes:
        choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
        return sse({**meta, "choices": [choice]})

    return SseScript(
        head=[],
        body=[event(piece, None) for piece in split_text(answer.text, chunks)],
        tail=_stream_tail(meta, event("", "stop"), answer, include_usage),
    )


def response_object(answer: Answer) -> Json:
    """A minimal, completed Responses API object with one output message (``resp_`` ids)."""
    content = [{"type": "output_text", "text": answer.text, "annotations": []}]
    message = {
        "type": "message",
        "id": answer.ident.replace("resp_", "msg_", 1),
        "status": "completed",
        "role": "assistant",
        "content": content,
    }
    counts = answer.counts
    return {
        "id": answer.ident,
        "object": "response",
        "created_at": answer.created,
        "status": "completed",
        "model": answer.model,
        "output": [message],
        "usage": {
            "input_tokens": counts["prompt_tokens"],
            "output_tokens": counts["completion_tokens"],
            "total_tokens": counts["total_tokens"],
        },
    }


# --- embeddings -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmbeddingInput:
    """One input to embed: a stable hash key (its JSON form) and its rough token count."""

    key: bytes
    tokens: int


def _is_tokens(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def embedding_inputs(value: object) -> list[EmbeddingInput] | None:
    """Normalise ``input`` (string, strings, token array, token arrays); None if none fits."""
    if isinstance(value, str):
        return [EmbeddingInput(orjson.dumps(value), len(value.split()))]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) for v in value):
        return [EmbeddingInput(orjson.dumps(v), len(v.split())) for v in value]
    if _is_tokens(value):
        return [EmbeddingInput(orjson.dumps(value), len(value))]
    if all(_is_tokens(v) for v in value):
        return [EmbeddingInput(orjson.dumps(v), len(v)) for v in value]
    return None


@lru_cache(maxsize=4096)
def embedding_vector(key: bytes, dim: int) -> tuple[tuple[float, ...], str]:
    """A unit vector derived from a hash of ``key``, as floats and as base64 float32.

    SHAKE-128 rather than ``hash()`` so vectors agree across processes (``PYTHONHASHSEED``).
    Values are rounded to float32 so the float and base64 forms decode to identical numbers.
    Cached because benchmarks embed the same few inputs over and over.
    """
    words = struct.unpack(f"<{dim}I", hashlib.shake_128(key).digest(4 * dim))
    raw = [w / 2147483648.0 - 1.0 for w in words]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    packed = struct.pack(f"<{dim}f", *(v / norm for v in raw))
    return struct.unpack(f"<{dim}f", packed), base64.b64encode(packed).decode("ascii")


def embeddings(model: str, inputs: list[EmbeddingInput], dim: int, as_base64: bool) -> Json:
    """The ``/v1/embeddings`` list object; base64 is what the openai SDK asks for by default."""
    data = []
    for index, item in enumerate(inputs):
        floats, encoded = embedding_vector(item.key, dim)
        vector: object = encoded if as_base64 else floats
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(item.tokens for item in inputs)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
