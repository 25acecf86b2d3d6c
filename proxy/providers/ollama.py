"""``ollama``: Ollama's native API, translated to and from OpenAI's.

=========================  ==================  =========================================
client calls               Ollama endpoint     answer
=========================  ==================  =========================================
``chat/completions``       ``/api/chat``       ``chat.completion`` or its SSE chunks
``completions``            ``/api/generate``   ``text_completion`` or its SSE chunks
``embeddings``             ``/api/embed``      OpenAI's embedding list
(discovery)                ``/api/tags``       model names
=========================  ==================  =========================================

Requests are translated here; answers in :mod:`proxy.providers.ollama_stream`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from multidict import CIMultiDict

from proxy.call import Call
from proxy.errors import InvalidRequest
from proxy.providers import ollama_stream
from proxy.providers.base import Provider, models_error
from proxy.upstream.client import UpstreamClient
from proxy.upstream.protocol import UpstreamRequest

# OpenAI sampling parameter -> Ollama ``options`` key.
_OPTIONS = {
    "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
    "max_tokens": "num_predict", "max_completion_tokens": "num_predict",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
}


class OllamaProvider(Provider):
    type_name = "ollama"
    honours_stream_usage = True  # ollama_stream adds OpenAI's usage chunk when asked

    def prepare(self, call: Call) -> UpstreamRequest:
        route = _ROUTES.get(call.endpoint)
        if route is None or call.method != "POST":
            raise InvalidRequest(
                f"The ollama provider '{self.name}' does not support {call.method} "
                f"/v1/{call.endpoint}; it serves chat/completions, completions and embeddings.",
                code="unsupported_endpoint")
        if call.payload is None:
            raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
        path, build = route
        body = build(call.payload, call.upstream_model or call.model or "")
        return self.upstream_request("POST", self.url(path), _ollama_headers(call.headers),
                                     orjson.dumps(body))

    def translate_headers(self, call: Call, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        for name in ("Content-Type", "Content-Encoding", "Content-Length"):
            headers.popall(name, None)
        headers["Content-Type"] = "text/event-stream" if call.stream else "application/json"
        return headers

    def translate_stream(self, call: Call, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return ollama_stream.translate(call, chunks)

    def translate_error(self, call: Call, status: int, body: bytes) -> bytes:
        return ollama_stream.error_body(status, body)

    async def list_models(self, client: UpstreamClient) -> list[str]:
        status, body = await client.get_json(self.url("api/tags"), self.control_headers(),
                                             self.name, self.tls)
        if status != 200:
            raise models_error(self, status, body)
        models = body.get("models") if isinstance(body, dict) else None
        names = (m.get("name") for m in models or () if isinstance(m, dict))
        return [name for name in names if isinstance(name, str) and name]


_OLLAMA_KEEPS = frozenset({"authorization", "x-request-id", "x-forwarded-for",
                           "x-forwarded-proto"})  # lower-cased: HTTP/2 clients send them so


def _ollama_headers(client: CIMultiDict[str]) -> CIMultiDict[str]:
    """Only the headers that mean something to Ollama: the body is a new one."""
    headers = CIMultiDict((k, v) for k, v in client.items() if k.lower() in _OLLAMA_KEEPS)
    headers["Content-Type"] = "application/json"
    headers["Accept"] = "application/x-ndjson, application/json"
    return headers


def _options(payload: dict[str, Any]) -> dict[str, Any]:
    return {target: payload[key] for key, target in _OPTIONS.items()
            if payload.get(key) is not None}


def _format(payload: dict[str, Any]) -> Any:
    response_format = payload.get("response_format")
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        return "json"
    if response_format.get("type") == "json_schema":
        schema = response_format.get("json_schema")
        return schema.get("schema") if isinstance(schema, dict) else None
    return None


def chat_body(payload: dict[str, Any], model: str) -> dict[str, Any]:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("'messages' must be a list of messages.", param="messages")
    body: dict[str, Any] = {
        "model": model,
        "messages": [_message(m) for m in messages],
        "stream": bool(payload.get("stream")),
        "options": _options(payload),
    }
    for key, value in (("format", _format(payload)), ("tools", payload.get("tools"))):
        if value is not None:
            body[key] = value
    return body


def generate_body(payload: dict[str, Any], model: str) -> dict[str, Any]:
    prompt = payload.get("prompt", "")
    if isinstance(prompt, list):
        prompt = "".join(p for p in prompt if isinstance(p, str))
    if not isinstance(prompt, str):
        raise InvalidRequest("'prompt' must be a string.", param="prompt")
    return {"model": model, "prompt": prompt, "stream": bool(payload.get("stream")),
            "options": _options(payload), "raw": False}


def embed_body(payload: dict[str, Any], model: str) -> dict[str, Any]:
    text = payload.get("input")
    if isinstance(text, str) or (isinstance(text, list)
                                 and all(isinstance(t, str) for t in text)):
        return {"model": model, "input": text}
    raise InvalidRequest("'input' must be a string or a list of strings for Ollama models.",
                         param="input")


def _message(message: Any) -> dict[str, Any]:
    """An OpenAI chat message as Ollama expects it (text + base64 images, tool calls)."""
    if not isinstance(message, dict):
        raise InvalidRequest("Each message must be an object.", param="messages")
    out: dict[str, Any] = {"role": message.get("role", "user")}
    content = message.get("content")
    if isinstance(content, list):
        out["content"] = "".join(p.get("text", "") for p in content
                                 if isinstance(p, dict) and p.get("type") == "text")
        images = [_image(p) for p in content if isinstance(p, dict)
                  and p.get("type") == "image_url"]
        if any(images):
            out["images"] = [image for image in images if image]
    else:
        out["content"] = content or ""
    if isinstance(message.get("tool_calls"), list):
        out["tool_calls"] = [_tool_call(c) for c in message["tool_calls"]]
    if message.get("name"):
        out["tool_name"] = message["name"]
    return out


def _image(part: dict[str, Any]) -> str | None:
    """Ollama takes bare base64; OpenAI sends ``data:`` URLs (remote URLs are dropped)."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if isinstance(url, str) and url.startswith("data:") and "," in url:
        return url.split(",", 1)[1]
    return None


def _tool_call(call: Any) -> dict[str, Any]:
    function = call.get("function", {}) if isinstance(call, dict) else {}
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = orjson.loads(arguments or "{}")
        except orjson.JSONDecodeError:
            arguments = {}
    return {"function": {"name": function.get("name", ""), "arguments": arguments}}


_ROUTES: dict[str, tuple[str, Callable[[dict[str, Any], str], dict[str, Any]]]] = {
    "chat/completions": ("api/chat", chat_body),
    "completions": ("api/generate", generate_body),
    "embeddings": ("api/embed", embed_body),
}
