"""Every error mapping of issue #2, each checked for its status and the exact OpenAI
shape ``{"error": {"message", "type", "param", "code"}}``; an upstream's own error
answers pass through untouched; secrets never leak into errors, ``/health`` or logs.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDictProxy
from openai.types.chat import ChatCompletionMessageParam

from tests.assertions import assert_error
from tests.conftest import MakeConfig, MockUpstream, StartFake, StartGateway

SECRET = "sk-upstream-secret"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m1", "messages": MESSAGES}


async def call(url: str, method: str = "POST", **kwargs: Any
               ) -> tuple[int, CIMultiDictProxy[str], bytes]:
    """One request with aiohttp's client: status, headers and raw body."""
    async with (aiohttp.ClientSession() as session,
                session.request(method, url, **kwargs) as resp):
        return resp.status, resp.headers, await resp.read()


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def failing(status: int, body: bytes, content_type: str) -> dict[str, Any]:
    """The ``Reply`` fields of an upstream error answer sent as it is, with headers the
    client must get too."""
    return {"status": status, "body": body, "headers": {
        "Content-Type": content_type, "X-Custom-Err": "abc", "Retry-After": "3"}}


@pytest.fixture
async def mock_gateway(mock_upstream: MockUpstream, make_config: MakeConfig,
                       start_gateway: StartGateway) -> str:
    config = make_config([{"name": "mock", "type": "openai_compat",
                           "base_url": mock_upstream.url}])
    return await start_gateway(config)


async def test_invalid_json_body_is_400(mock_gateway: str) -> None:
    status, _, body = await call(f"{mock_gateway}/v1/chat/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    assert status == 400
    assert_error(body, "invalid_json")


async def test_json_array_body_is_400(mock_gateway: str) -> None:
    status, _, body = await call(f"{mock_gateway}/v1/chat/completions", json=[CHAT])
    assert status == 400
    assert_error(body, "invalid_json")


@pytest.mark.parametrize("payload", [{"messages": MESSAGES},
                                     {"model": 123, "messages": MESSAGES},
                                     {"model": "", "messages": MESSAGES}])
async def test_missing_or_invalid_model_is_400(mock_gateway: str, payload: Any) -> None:
    status, _, body = await call(f"{mock_gateway}/v1/chat/completions", json=payload)
    assert status == 400
    assert_error(body, "missing_model", param="model")


async def test_unknown_model_is_404_and_names_nothing_secret(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    a, b = await start_fake(("alpha-1",)), await start_fake(("beta-1",))
    url_a, url_b = a.url.removesuffix("/v1"), b.url.removesuffix("/v1")
    config = make_config([a.provider("a", discover=True, api_key_env="UP_KEY"),
                          b.provider("b", discover=True)], env={"UP_KEY": SECRET})
    gateway = await start_gateway(config)
    status, _, body = await call(f"{gateway}/v1/chat/completions",
                                 json={"model": "no-such-model", "messages": MESSAGES})
    assert status == 404
    message = assert_error(body, "model_not_found", param="model")
    assert "no-such-model" in message
    for secret in (SECRET, url_a, url_b, "127.0.0.1"):
        assert secret not in body.decode()
    status, _, _ = await call(f"{gateway}/v1/chat/completions",
                              json={"model": "beta-1", "messages": MESSAGES})
    assert status == 200  # the same gateway routes a listed model


async def test_body_over_limit_is_413_with_content_length(
    mock_upstream: MockUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    config = make_config([{"name": "mock", "type": "openai_compat",
                           "base_url": mock_upstream.url}], server={"max_body_bytes": 1024})
    gateway = await start_gateway(config)
    big = {"model": "mock-gpt", "messages": [{"role": "user", "content": "x" * 2048}]}
    status, _, body = await call(f"{gateway}/v1/chat/completions", json=big)
    assert status == 413
    assert_error(body, "request_too_large")
    small = {"model": "mock-gpt", "messages": MESSAGES}
    status, _, _ = await call(f"{gateway}/v1/chat/completions", json=small)
    assert status == 200


async def test_body_over_limit_is_413_when_chunked(
    mock_upstream: MockUpstream, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    config = make_config([{"name": "mock", "type": "openai_compat",
                           "base_url": mock_upstream.url}], server={"max_body_bytes": 1024})
    gateway = await start_gateway(config)
    big = orjson.dumps({"model": "mock-gpt",
                        "messages": [{"role": "user", "content": "x" * 4096}]})

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 512):
            yield big[start:start + 512]

    status, _, body = await call(f"{gateway}/v1/chat/completions", data=chunks(),
                                 headers={"Content-Type": "application/json"})
    assert status == 413
    assert_error(body, "request_too_large")


async def test_unreachable_upstream_is_502_at_once(
    make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    config = make_config([{"name": "dead", "type": "openai_compat", "models": ["m1"],
                           "base_url": f"http://127.0.0.1:{closed_port()}/v1"}])
    gateway = await start_gateway(config)
    started = time.perf_counter()
    status, _, body = await call(f"{gateway}/v1/chat/completions", json=CHAT)
    elapsed = time.perf_counter() - started
    assert status == 502
    assert_error(body, "upstream_unreachable", type_="upstream_error")
    assert elapsed < 1.0


async def test_upstream_timeout_is_504_after_read_timeout(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    slow = await start_fake(("m1",), latency=3)
    config = make_config([slow.provider("slow")], timeouts={"read": 0.5})
    gateway = await start_gateway(config)
    started = time.perf_counter()
    status, _, body = await call(f"{gateway}/v1/chat/completions", json=CHAT)
    elapsed = time.perf_counter() - started
    assert status == 504
    assert_error(body, "upstream_headers_timeout", type_="upstream_error")
    assert 0.4 <= elapsed < 2.0


@pytest.mark.parametrize("status", [400, 429, 500, 503])
async def test_upstream_error_passes_through_unchanged(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
    status: int,
) -> None:
    sent = orjson.dumps({"error": {"message": f"upstream says {status}", "type": "x_error",
                                   "param": "messages", "code": f"up_{status}"}})
    upstream = await start_fake(("m1",), **failing(status, sent, "application/json"))
    gateway = await start_gateway(make_config([upstream.provider()]))
    got_status, headers, body = await call(f"{gateway}/v1/chat/completions", json=CHAT)
    assert (got_status, body) == (status, sent)
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Custom-Err"] == "abc"
    assert headers["Retry-After"] == "3"


async def test_non_json_upstream_error_passes_through_unchanged(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    sent = b"Service Unavailable: back in a minute\n"
    upstream = await start_fake(("m1",), **failing(503, sent, "text/plain"))
    gateway = await start_gateway(make_config([upstream.provider()]))
    status, headers, body = await call(f"{gateway}/v1/chat/completions", json=CHAT)
    assert (status, body) == (503, sent)
    assert headers["Content-Type"].startswith("text/plain")


async def test_unknown_route_is_404_openai_shaped(mock_gateway: str) -> None:
    status, _, body = await call(f"{mock_gateway}/nope", "GET")
    assert status == 404
    assert "/nope" in assert_error(body, "not_found")


async def test_upstream_401_is_authentication_error_in_the_sdk(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
    openai_client: Callable[..., openai.AsyncOpenAI],
) -> None:
    sent = orjson.dumps({"error": {"message": "Incorrect API key provided",
                                   "type": "invalid_request_error", "param": None,
                                   "code": "invalid_api_key"}})
    upstream = await start_fake(("m1",), **failing(401, sent, "application/json"))
    gateway = await start_gateway(make_config([upstream.provider()]))
    client = openai_client(gateway)
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(model="m1", messages=MESSAGES)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert "Incorrect API key provided" in caught.value.message


async def test_secrets_stay_out_of_errors_health_and_logs(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    slow = await start_fake(("m-slow",), latency=3)
    config = make_config([
        {"name": "dead", "type": "openai_compat", "models": ["m-dead"],
         "base_url": f"http://127.0.0.1:{closed_port()}/v1", "api_key_env": "UP_KEY"},
        slow.provider("slow", api_key_env="UP_KEY"),
    ], env={"UP_KEY": SECRET}, timeouts={"read": 0.5})
    gateway = await start_gateway(config)
    bodies: dict[int, bytes] = {}
    for model in ("m-dead", "m-slow", "m-unknown"):
        status, _, body = await call(f"{gateway}/v1/chat/completions",
                                     json={"model": model, "messages": MESSAGES})
        bodies[status] = body
    status, _, health = await call(f"{gateway}/health", "GET")
    assert sorted(bodies) == [404, 502, 504]
    assert status == 200
    assert orjson.loads(health)["status"] == "degraded"
    seen = [headers.get("Authorization") for headers in slow.headers(None)]
    assert f"Bearer {SECRET}" in seen  # the key is in use, so leaking it was possible
    for text in (*bodies.values(), health):
        assert SECRET.encode() not in text
    assert caplog.records  # the gateway did log (the dead provider's warning at least)
    assert SECRET not in caplog.text


async def test_a_body_that_does_not_decode_is_400_and_never_forwarded(
    start_fake: StartFake, make_config: MakeConfig, start_gateway: StartGateway,
) -> None:
    upstream = await start_fake()
    gateway = await start_gateway(make_config([upstream.provider(discover=True,
                                                                 catch_all=True)]))
    status, _, body = await call(
        f"{gateway}/v1/chat/completions", data=b"this is not gzip at all",
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert status == 400
    assert_error(body, "invalid_body")
    assert upstream.chats == 0
