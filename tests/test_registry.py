"""Providers are plugins (issue #2: "a small base interface and a registry keyed by
``type``. Adding a provider type is one new module plus one registry line, with no
change to routing or the server").

The dummy provider type below is that module, written here; ``monkeypatch.setitem``
is the registry line (undone after the test). Its upstream speaks a made-up API: models
under ``/names``, completions under ``/complete`` as ``{"name", "text"}``, answers as
plain text. Nothing else in the gateway is told about it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.call import Call
from proxy.providers import PROVIDER_TYPES, Provider
from proxy.upstream.client import UpstreamClient
from proxy.upstream.protocol import UpstreamRequest
from tests.conftest import MakeConfig, StartGateway, StartUpstream

Client = Callable[..., openai.AsyncOpenAI]


class DummyProvider(Provider):
    type_name = "dummy_test"

    def prepare(self, call: Call) -> UpstreamRequest:
        messages = (call.payload or {}).get("messages", [])
        text = " ".join(str(m.get("content", "")) for m in messages)
        body = orjson.dumps({"name": call.upstream_model, "text": text})
        headers = CIMultiDict({"Content-Type": "application/json"})
        return self.upstream_request("POST", self.url("complete"), headers, body)

    def translate_headers(self, call: Call, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        for name in ("Content-Type", "Content-Length"):
            headers.popall(name, None)
        headers["Content-Type"] = "application/json"
        return headers

    async def translate_stream(self, call: Call, chunks: AsyncIterator[bytes]
                               ) -> AsyncIterator[bytes]:
        text = b"".join([chunk async for chunk in chunks]).decode()
        yield orjson.dumps({
            "id": "chatcmpl-dummy", "object": "chat.completion", "created": 1,
            "model": call.model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]})

    async def list_models(self, client: UpstreamClient) -> list[str]:
        status, body = await client.get_json(self.url("names"), self.control_headers(),
                                             self.name, self.tls)
        assert status == 200
        return list(body["names"])


def _dummy_upstream(received: list[dict[str, Any]]) -> web.Application:
    """The registered type's own API (``/names``, ``/complete``): not OpenAI's, so not
    FakeUpstream's."""
    async def names(request: web.Request) -> web.Response:
        return web.json_response({"names": ["tiny-1"]})

    async def complete(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="dummy says hi", content_type="text/plain")

    app = web.Application()
    app.router.add_get("/names", names)
    app.router.add_post("/complete", complete)
    return app


async def test_a_registered_provider_type_serves_requests(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(PROVIDER_TYPES, DummyProvider.type_name, DummyProvider)
    received: list[dict[str, Any]] = []
    url = await start_upstream(_dummy_upstream(received))
    config = make_config([{"name": "dum", "type": "dummy_test", "base_url": url}])
    client = openai_client(await start_gateway(config))
    assert [m.id for m in (await client.models.list()).data] == ["tiny-1"]
    for model in ("tiny-1", "dum/tiny-1"):
        answer = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}])
        assert answer.choices[0].message.content == "dummy says hi"
        assert answer.model == model
    assert received == [{"name": "tiny-1", "text": "hello"}] * 2

