"""TLS upstreams on the hot path (issue #3: "Whatever you choose must pass the same tests
as ClientSession would (... TLS upstreams)"): the connector still does the TLS, with the
CAs of the provider's ``ca_file`` (a throwaway CA made here with openssl), for inference,
streaming and discovery alike; an untrusted certificate is a 502 naming the provider."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import build_app
from proxy.server.serve import running
from proxy.state import LIVE
from tests.conftest import MakeConfig, StartGateway
from tests.wire import error_code, fetch

OPENSSL = "/usr/bin/openssl"
SECRET = "sk-tls-upstream-secret"
EVENTS = [b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"tls-m",'
          b'"choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}\n\n' % w
          for w in (b"se", b"cure")]
COMPLETION = {"id": "chatcmpl-tls", "object": "chat.completion", "created": 1,
              "model": "tls-m", "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant",
                                                         "content": "secure"}}]}
AsyncClientFactory = Callable[..., openai.AsyncOpenAI]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA (``ca.pem``) and a server certificate for IP 127.0.0.1 it signed."""
    tmp = tmp_path_factory.mktemp("tls")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=wire test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=tmp)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=tmp)
    (tmp / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf",
             cwd=tmp)
    return tmp


def _tls_app(peers: list[int]) -> web.Application:
    """A tiny OpenAI upstream; records the client port of every chat request. (Its own
    app: the client port is a fact of the connection, which FakeUpstream does not keep.)"""
    async def chat(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername")[1])  # type: ignore[union-attr]
        body = await request.json()
        if not body.get("stream"):
            return web.json_response(COMPLETION)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in [*EVENTS, b"data: [DONE]\n\n"]:
            await response.write(event)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tls-m"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


@pytest.fixture
async def tls_upstream(certs: Path) -> AsyncIterator[tuple[str, list[int]]]:
    """The https base URL (with /v1) of ``_tls_app``, and its recorded client ports."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    peers: list[int] = []
    server = TestServer(_tls_app(peers), host="127.0.0.1", port=0)
    await server.start_server(ssl=context)
    try:
        yield f"https://127.0.0.1:{server.port}/v1", peers
    finally:
        await server.close()


def _provider(url: str, **extra: Any) -> dict[str, Any]:
    return {"name": "secure", "type": "openai_compat", "base_url": url,
            "api_key_env": "SECURE_KEY", **extra}


async def test_tls_upstream_with_ca_file(
        certs: Path, tls_upstream: tuple[str, list[int]], start_gateway: StartGateway,
        make_config: MakeConfig, openai_client: AsyncClientFactory) -> None:
    base_url, peers = tls_upstream
    config = make_config([_provider(base_url, ca_file=str(certs / "ca.pem"))],
                         env={"SECURE_KEY": SECRET})
    client = openai_client(await start_gateway(config))
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tls-m"]  # discovery over TLS
    for _ in range(2):
        completion = await client.chat.completions.create(
            model="tls-m", messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == "secure"
    stream = await client.chat.completions.create(
        model="tls-m", messages=[{"role": "user", "content": "hi"}], stream=True)
    words = [chunk.choices[0].delta.content async for chunk in stream]
    assert words == ["se", "cure"]
    assert len(peers) == 3
    assert len(set(peers)) == 1  # one TLS connection, kept alive and reused


async def test_untrusted_certificate_is_502_naming_the_provider(
        tls_upstream: tuple[str, list[int]], start_gateway: StartGateway,
        make_config: MakeConfig) -> None:
    base_url, peers = tls_upstream
    config = make_config([_provider(base_url, models=["tls-m"])], env={"SECURE_KEY": SECRET})
    url = await start_gateway(config)
    status, _, body = await fetch(f"{url}/v1/chat/completions",
                                  body={"model": "tls-m", "messages": []})
    text = body.decode()
    assert (status, error_code(body)) == (502, "upstream_unreachable")
    assert "'secure'" in text
    assert SECRET not in text
    assert base_url.split("/")[2] not in text
    assert peers == []  # nothing reached the upstream's handler
    status, _, listing = await fetch(f"{url}/v1/models", "GET")  # discovery: same failure
    [failure] = orjson.loads(listing)["errors"]
    assert (status, failure["provider"]) == (200, "secure")
    assert SECRET not in listing.decode()
    for message in (orjson.loads(body)["error"]["message"], failure["message"]):
        assert "certificate" in message.lower()  # the reason, not a stray OS error text


async def test_a_reload_keeps_the_tls_upstreams_pooled_connection_and_cap(
        certs: Path, tls_upstream: tuple[str, list[int]], make_config: MakeConfig) -> None:
    """The pool keys origins on the SSL context: a reload must reuse the provider's
    (same CA file, unchanged), or it strands the old origin's connections and cap."""
    base_url, peers = tls_upstream
    entry = _provider(base_url, ca_file=str(certs / "ca.pem"), models=["tls-m"])
    config = make_config([entry], env={"SECURE_KEY": SECRET}, server={"port": 0})
    app = build_app(config)
    async with running(config, app=app) as base, aiohttp.ClientSession() as session:
        body = {"model": "tls-m", "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(f"{base}/v1/chat/completions", json=body) as response:
            assert response.status == 200
        app[LIVE].reload(make_config([entry], env={"SECURE_KEY": SECRET}))
        async with session.post(f"{base}/v1/chat/completions", json=body) as response:
            assert response.status == 200
        pool = app[LIVE].shared.client._pool
        assert len(pool._origins) == 1 and "open=1 idle=1" in repr(pool)
    assert len(set(peers)) == 1  # the same TLS connection, before and after
