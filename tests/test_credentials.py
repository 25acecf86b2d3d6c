"""Whose credentials go upstream (issue #2: "Upstream API keys are read from the env var
named by ``api_key_env`` and injected as ``Authorization: Bearer``"; the client's own
``Authorization`` is forwarded only where that is allowed).

* a configured key replaces the client's;
* ``forward_client_auth: false`` drops the client's;
* an ``api_key_env`` naming an unset variable never forwards the client's either
  (``forward_client_auth`` defaults to "no ``api_key_env``", ``proxy/config/loader.py``);
* with neither, the client's is forwarded (the drop-in's default).
"""

from __future__ import annotations

from collections.abc import Callable

import openai
from aiohttp import web

from tests.conftest import MakeConfig, StartGateway, StartUpstream

CLIENT_KEY = "sk-client-own-0123"
UPSTREAM_KEY = "sk-configured-upstream-4567"
UNSET = "CREDENTIALS_TEST_NEVER_SET"
Client = Callable[..., openai.AsyncOpenAI]


def _recording(seen: dict[str, list[list[str]]]) -> web.Application:
    """Answers every chat; records, per model, every Authorization header it carried."""
    async def chat(request: web.Request) -> web.Response:
        model = (await request.json())["model"]
        seen.setdefault(model, []).append(request.headers.getall("Authorization", []))
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "ok"}}]})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_whose_authorization_goes_upstream(
    start_upstream: StartUpstream, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Client,
) -> None:
    seen: dict[str, list[list[str]]] = {}
    url = f"{await start_upstream(_recording(seen))}/v1"

    def provider(name: str, **extra: object) -> dict[str, object]:
        return {"name": name, "type": "openai_compat", "base_url": url,
                "models": [f"m-{name}"], **extra}

    config = make_config([
        provider("keyed", api_key_env="CREDENTIALS_TEST_KEY"),
        provider("no-forward", forward_client_auth=False),
        provider("unset-key", api_key_env=UNSET),
        provider("plain"),
    ], env={"CREDENTIALS_TEST_KEY": UPSTREAM_KEY})
    client = openai_client(await start_gateway(config), api_key=CLIENT_KEY)
    for name in ("keyed", "no-forward", "unset-key", "plain"):
        answer = await client.chat.completions.create(
            model=f"m-{name}", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "ok"
    assert seen == {
        "m-keyed": [[f"Bearer {UPSTREAM_KEY}"]],  # replaced, not added beside the client's
        "m-no-forward": [[]],
        "m-unset-key": [[]],
        "m-plain": [[f"Bearer {CLIENT_KEY}"]],
    }

