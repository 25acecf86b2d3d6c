"""``openai_compat``: any server that speaks OpenAI's HTTP API (OpenAI, OpenRouter,
ModelScope, vLLM, LM Studio, llama.cpp, ...).

Nothing is translated: the request path under ``/v1/`` is appended to ``base_url``, the
client's body bytes go up untouched (unless routing renamed the model), and the answer's
bytes come back untouched, SSE included. The one exception: a stream whose client did
not ask for its usage is sent with ``stream_options.include_usage`` (unless the provider
has ``stream_usage: false``), and ``observe/usage.py`` takes out what that adds.
"""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

from proxy.call import Call
from proxy.headers import AUTHORIZATION
from proxy.providers.base import Provider, models_error
from proxy.upstream.client import UpstreamClient
from proxy.upstream.protocol import UpstreamRequest


class OpenAICompatProvider(Provider):
    type_name = "openai_compat"
    translates_body = False
    honours_stream_usage = True

    def prepare(self, call: Call) -> UpstreamRequest:
        return self.upstream_request(call.method, self.url(call.endpoint, call.query),
                                     call.headers, call.body_for_upstream())

    async def list_models(self, client: UpstreamClient) -> list[str]:
        return [entry["id"] for entry in await self._listing(client, self.control_headers())]

    async def list_models_as(self, client: UpstreamClient, authorization: str
                             ) -> list[dict[str, Any]]:
        headers = self.control_headers()
        headers[AUTHORIZATION] = authorization  # only for a provider with no key of its own
        return await self._listing(client, headers)

    async def _listing(self, client: UpstreamClient, headers: CIMultiDict[str]
                       ) -> list[dict[str, Any]]:
        """``GET models``: the upstream's entries that have an ``id``, as it sent them."""
        status, body = await client.get_json(self.url("models"), headers, self.name, self.tls)
        if status != 200:
            raise models_error(self, status, body)
        return _model_entries(body)


def _model_entries(body: Any) -> list[dict[str, Any]]:
    data = body.get("data") if isinstance(body, dict) else body
    if not isinstance(data, list):
        return []
    return [item for item in data
            if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]]
