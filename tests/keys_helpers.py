"""Small upstreams and clients about keys, each shared by two test files:

* ``keyed``: the fake upstream lists different models per caller key (``MODELS_BY_KEY``),
  401 for any other key; ``authorizations`` are the keys it was asked with (the drop-in
  tests);
* ``USAGE`` and ``limited_post``: what the fake upstream's answers report (``USED``
  tokens), and a request with the rate-limited key ``SECRET`` (test_ratelimit.py,
  test_redis_limits.py).
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from tests.fake_upstream import MODELS, FakeUpstream, Reply, Seen

# Each key's models, as the upstream sends them (created/owned_by are its own).
MODELS_BY_KEY = {
    "Bearer sk-caller-a": [{"id": "model-a", "object": "model", "created": 1700000001,
                            "owned_by": "org-a"}],
    "Bearer sk-caller-b": [{"id": "model-b1", "object": "model", "created": 1700000002,
                            "owned_by": "org-b"},
                           {"id": "model-b2", "object": "model", "created": 1700000003,
                            "owned_by": "org-b"}],
}


def keyed(fake: FakeUpstream) -> FakeUpstream:
    """``fake``'s ``/v1/models`` answers each key in ``MODELS_BY_KEY`` its own list, and
    401 to any other key (or none)."""
    refused = Reply(status=401, body={"error": {
        "message": "bad key", "type": "invalid_request_error", "code": "invalid_api_key"}})

    async def hook(request: web.Request, seen: Seen) -> Reply | None:
        if seen.path != MODELS:
            return None
        models = MODELS_BY_KEY.get(seen.headers.get("Authorization", ""))
        return refused if models is None else Reply(body={"object": "list", "data": models})

    fake.hook = hook
    return fake


def authorizations(fake: FakeUpstream) -> list[str | None]:
    """The ``Authorization`` of each model listing ``fake`` was asked for, in order."""
    return [headers.get("Authorization") for headers in fake.headers(MODELS)]


MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]




SECRET = "sk-gw-limited-key-for-tests"


USED = 20
# What the fake upstream reports for each answer (``start_fake(usage=USAGE)``).
USAGE = {"prompt_tokens": 5, "completion_tokens": USED - 5, "total_tokens": USED}


async def limited_post(session: aiohttp.ClientSession, base: str, **fields: Any
               ) -> tuple[int, dict[str, str], bytes]:
    async with session.post(f"{base}/v1/chat/completions",
                            headers={"Authorization": f"Bearer {SECRET}"},
                            json={"model": "m", "messages": MESSAGES, **fields}) as response:
        return response.status, dict(response.headers), await response.read()
