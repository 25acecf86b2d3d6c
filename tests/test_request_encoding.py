"""Compressed request bodies (issue 9, part 3): aiohttp decodes a ``Content-Encoding``
body before the gateway reads it, so the decoded bytes must go upstream without that
header (a mismatch made the upstream fail, retries follow, the breaker opened for
everyone); a coding it cannot decode is refused, never forwarded; a body that does not
decode is a 400 with no traceback in the log. A real upstream records what it received.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.conftest import MakeConfig, StartGateway, StartUpstream
from tests.wire import gateway

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {"id": "chatcmpl-z", "object": "chat.completion", "created": 0, "model": "m",
          "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": "ok"}}]}


@dataclass
class Seen:
    """Each inference request as the upstream got it: its headers and its raw body."""

    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


def recording_upstream(seen: Seen) -> web.Application:
    """Keeps each inference request's headers and raw body. (Its own app: the body as
    it came on the wire, encoded; FakeUpstream reads it decoded.)"""
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        # The raw bytes, as sent: request.read() would decode a Content-Encoding itself.
        body = await request.content.read() if "Content-Encoding" not in request.headers \
            else b"<encoded>"
        seen.requests.append((dict(request.headers), body))
        payload = orjson.loads(body)  # a mismatch fails here, as a real upstream would
        if not payload.get("stream"):
            return web.json_response(ANSWER)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n')
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def _gateway(start_upstream: StartUpstream, start_gateway: StartGateway,
                   make_config: MakeConfig) -> tuple[str, Seen]:
    seen = Seen()
    upstream = await start_upstream(recording_upstream(seen))
    url = await gateway(start_gateway, make_config, f"{upstream}/v1", cache={"enabled": False},
                        retries={"max_attempts": 3})
    return url, seen


async def _post(url: str, body: bytes, coding: str) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json", "Content-Encoding": coding}
    async with aiohttp.ClientSession(auto_decompress=False) as session, session.post(
            f"{url}/v1/chat/completions", data=body, headers=headers) as response:
        return response.status, await response.read()


@pytest.mark.parametrize(("coding", "compress"), [
    ("gzip", gzip.compress), ("GZIP", gzip.compress), ("deflate", zlib.compress)])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_compressed_body_goes_upstream_decoded_without_its_coding(
    coding: str, compress: object, stream: bool, start_upstream: StartUpstream,
    start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    url, seen = await _gateway(start_upstream, start_gateway, make_config)
    # A stream asks for its usage itself, so the gateway adds nothing (tests/test_usage.py).
    asks = {"stream_options": {"include_usage": True}} if stream else {}
    plain = orjson.dumps({**CHAT, "stream": stream, **asks})
    assert callable(compress)
    status, answer = await _post(url, compress(plain), coding)
    assert status == 200, answer
    assert (b"data: [DONE]" in answer) if stream else orjson.loads(answer) == ANSWER
    [(headers, body)] = seen.requests  # one attempt: no failure, no retry
    assert "Content-Encoding" not in headers
    assert body == plain
    assert headers["Content-Length"] == str(len(plain))


async def test_an_unknown_content_coding_gets_415_and_is_not_forwarded(
    start_upstream: StartUpstream, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    url, seen = await _gateway(start_upstream, start_gateway, make_config)
    for coding in ("compress", "gzip, gzip", "br"):  # br: aiohttp decodes it only with Brotli
        status, answer = await _post(url, b"\x1f\x8b-not-json", coding)
        assert status == 415, (coding, answer)
        error = orjson.loads(answer)["error"]
        assert error["code"] == "unsupported_content_encoding"
        assert error["type"] == "invalid_request_error"
    assert seen.requests == []


async def test_identity_coding_is_forwarded_as_is(
    start_upstream: StartUpstream, start_gateway: StartGateway, make_config: MakeConfig,
) -> None:
    url, seen = await _gateway(start_upstream, start_gateway, make_config)
    status, _ = await _post(url, orjson.dumps(CHAT), "identity")
    assert status == 200
    [(headers, body)] = seen.requests
    assert "Content-Encoding" not in headers and orjson.loads(body) == CHAT


async def test_a_body_that_does_not_decode_gets_400_without_a_traceback(
    start_upstream: StartUpstream, start_gateway: StartGateway, make_config: MakeConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, seen = await _gateway(start_upstream, start_gateway, make_config)
    caplog.set_level(logging.DEBUG)
    for coding in ("gzip", "deflate"):
        status, answer = await _post(url, b"\x1f\x8b\x08\x00 this is not gzip at all", coding)
        assert status == 400, answer
        assert orjson.loads(answer)["error"]["code"] == "invalid_body"
    # The gateway still serves, and nothing logged a traceback or an ERROR.
    status, _ = await _post(url, gzip.compress(orjson.dumps(CHAT)), "gzip")
    assert status == 200
    assert len(seen.requests) == 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
        [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Traceback" not in caplog.text
