"""The routing tests' fake providers (tests/test_routing.py, test_routing_order.py):
a ``Fake`` lists its models and answers any other path with its own name, keeping every
request it got byte for byte, so a test sees where a model was routed and what was sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import StartUpstream

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@dataclass
class Received:
    method: str
    raw_path: str  # path and query exactly as they came over the wire
    body: bytes

    @property
    def model(self) -> str | None:
        payload = orjson.loads(self.body) if self.body else {}
        return payload.get("model") if isinstance(payload, dict) else None


@dataclass
class Fake:
    """One fake provider: its ``/v1/models`` list, and what it was sent. Not FakeUpstream:
    it answers every method on every ``/v1/`` path and keeps each raw path as it came."""

    name: str
    models: list[str] = field(default_factory=list)
    models_status: int = 200
    received: list[Received] = field(default_factory=list)
    models_calls: int = 0
    url: str = ""  # base URL including /v1, set once started

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._list)
        app.router.add_route("*", "/v1/{tail:.*}", self._any)
        return app

    async def _list(self, request: web.Request) -> web.Response:
        self.models_calls += 1
        if self.models_status != 200:
            return web.json_response({"error": {"message": "down"}}, status=self.models_status)
        data = [{"id": m, "object": "model", "created": 1, "owned_by": "x"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _any(self, request: web.Request) -> web.Response:
        received = Received(request.method, request.raw_path, await request.read())
        self.received.append(received)
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
            "model": received.model or "",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": self.name}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    @property
    def models_sent(self) -> list[str | None]:
        """The ``model`` of each request it received, in order."""
        return [received.model for received in self.received]

    def provider(self, **extra: Any) -> dict[str, Any]:
        return {"name": self.name, "type": "openai_compat", "base_url": self.url, **extra}


async def start_fakes(start_upstream: StartUpstream, *fakes: Fake) -> None:
    for fake in fakes:
        fake.url = f"{await start_upstream(fake.app())}/v1"


async def chat_with(client: openai.AsyncOpenAI, model: str) -> tuple[str, str]:
    """(the upstream that answered, the model name it received)."""
    answer = await client.chat.completions.create(model=model, messages=USER)
    return answer.choices[0].message.content or "", answer.model
