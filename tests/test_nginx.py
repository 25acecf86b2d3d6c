"""The shipped ``deploy/nginx.conf``, run by a real nginx in front of two real workers.

Issue #3: "An integration test starts a real nginx ... with that config and a throwaway
self-signed certificate in front of 2 workers, and sends HTTPS requests through it:
non-stream and stream. It proves both workers serve traffic and that a stream's first
chunk reaches the client before the upstream has finished (nginx does not buffer it)."

Issue 9, part 3: "make the nginx test use the shipped file as shipped, with only the
marked certificate paths and ports substituted". So nginx runs as in production: a root
master whose workers switch to nginx's default user (``nobody``), and the gateway runs
exactly as the file's header says, ``proxy serve --workers 2 --socket-dir /run/proxy``
(the sockets' mode, ``server.socket_mode``, is what lets those workers connect). Runs
are serialised by a lock file, and skipped with the reason when nginx is missing, when
not root (``.ci/run`` runs as root and installs nginx) or when some other gateway
already listens in /run/proxy. The dedup test through nginx is ``test_nginx_dedup.py``.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.config.sections import ServerConfig
from proxy.config.timeouts import Timeouts
from tests.conftest import StartUpstream
from tests.nginx_helpers import SHIPPED, behind_nginx, directives, needs_nginx
from tests.procs import poll_healthz

MESSAGES = [{"role": "user", "content": "hi"}]


def test_shipped_config_keeps_its_promises() -> None:
    conf = directives()
    for promise in (r"least_conn;", r"proxy_buffering\s+off;", r"keepalive\s+\d+;",
                    r"listen\s+443\s+ssl\s+http2;|http2\s+on;", r"proxy_http_version\s+1\.1;",
                    r'proxy_set_header\s+Connection\s+"";',
                    r"proxy_set_header\s+X-Forwarded-For\s",
                    r"proxy_set_header\s+X-Forwarded-Proto\s",
                    r"proxy_set_header\s+X-Request-ID\s",
                    r"server\s+unix:/run/proxy/worker-0\.sock",
                    r"server\s+unix:/run/proxy/worker-1\.sock"):
        assert re.search(promise, conf), f"deploy/nginx.conf lost: {promise}"
    body_mib = re.search(r"client_max_body_size\s+(\d+)m;", conf)
    assert body_mib and int(body_mib[1]) * 1024 * 1024 == ServerConfig().max_body_bytes
    read = re.search(r"proxy_read_timeout\s+(\d+)s;", conf)
    assert read and int(read[1]) >= Timeouts().read, "nginx would cut streams the gateway keeps"
    text = SHIPPED.read_text()
    assert len(re.findall(r"ssl_certificate(_key)?\s+\S+;\s+#\s*REPLACE", text)) == 2
    assert "proxy serve --workers 2 --socket-dir /run/proxy" in text
    assert not re.search(r"^\s*user\s", conf, re.MULTILINE), "nginx's default user is tested"


def gated_upstream(release: asyncio.Event, finished: asyncio.Event,
                   seen: list[CIMultiDict[str]]) -> web.Application:
    """Answers chat; a streamed answer sends its first event, then waits for ``release``
    (set by the test only once that event has reached the client through nginx). (Its
    own app: a pause between two events; FakeUpstream's gate holds only the first.)"""
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(request.headers.copy())
        if not body.get("stream"):
            return web.json_response({"id": "c1", "object": "chat.completion", "model": "m",
                                      "created": 0, "choices": [{
                                          "index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant",
                                                      "content": "through nginx"}}]})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_event("first"))
        await asyncio.wait_for(release.wait(), 20)
        await response.write(_event("second") + b"data: [DONE]\n\n")
        finished.set()
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


def _event(text: str) -> bytes:
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


@needs_nginx
async def test_https_through_nginx_to_two_workers(
    start_upstream: StartUpstream, tmp_path: Path
) -> None:
    release, finished = asyncio.Event(), asyncio.Event()
    seen: list[CIMultiDict[str]] = []
    upstream = await start_upstream(gated_upstream(release, finished, seen))
    async with AsyncExitStack() as stack:
        deployment = await stack.enter_async_context(behind_nginx(upstream, tmp_path))
        stack.callback(release.set)  # never leave the upstream handler waiting
        session = await stack.enter_async_context(deployment.session())
        base = deployment.base

        await _non_stream_keeps_request_ids(session, base, seen)
        await _stream_is_not_buffered(session, base, release, finished)
        pids = await poll_healthz(session, f"{base}/healthz", lambda s: len(s) == 2,
                                  [deployment.proxy, deployment.nginx])
        assert sorted(pids.values()) == [0, 1], "both workers must serve through nginx"
        await _speaks_http2(deployment.port, deployment.cert)


async def _non_stream_keeps_request_ids(session: aiohttp.ClientSession, base: str,
                                        seen: list[CIMultiDict[str]]) -> None:
    url = f"{base}/v1/chat/completions"
    request = {"model": "m", "messages": MESSAGES}
    async with session.post(url, json=request, headers={"X-Request-ID": "via-nginx-1"}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["choices"][0]["message"]["content"] == "through nginx"
        assert r.headers["X-Request-ID"] == "via-nginx-1"
    assert seen[-1]["X-Request-ID"] == "via-nginx-1"
    assert seen[-1]["X-Forwarded-Proto"] == "https"
    assert seen[-1]["X-Forwarded-For"].startswith("127.0.0.1")
    async with session.post(url, json=request) as r:  # none sent: nginx makes one
        assert r.status == 200, await r.text()
        made = r.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", made) and seen[-1]["X-Request-ID"] == made


async def _stream_is_not_buffered(session: aiohttp.ClientSession, base: str,
                                  release: asyncio.Event, finished: asyncio.Event) -> None:
    """The upstream cannot finish before ``release``, which is set only once the first
    event has come out of nginx: had nginx buffered it, the read below would time out."""
    request = {"model": "m", "stream": True, "messages": MESSAGES}
    async with session.post(f"{base}/v1/chat/completions", json=request) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        try:
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        except TimeoutError:
            pytest.fail("the first SSE event did not get through nginx while the upstream "
                        "held the stream open: it was buffered")
        assert b'"first"' in first
        assert not finished.is_set()
        release.set()
        rest = await asyncio.wait_for(r.content.read(), 10)
    assert b'"second"' in rest and rest.endswith(b"data: [DONE]\n\n")
    assert finished.is_set()


async def _speaks_http2(port: int, cert: Path) -> None:
    """ALPN picks h2 (Python's ssl module, always available); with a curl that supports
    HTTP/2, one real h2 request as well (aiohttp's client speaks HTTP/1.1 only)."""
    tls = ssl.create_default_context(cafile=str(cert))
    tls.set_alpn_protocols(["h2", "http/1.1"])
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    try:
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    finally:
        writer.transport.abort()  # nginx has already sent its h2 SETTINGS: no TLS goodbye
    curl = shutil.which("curl")
    if curl is None or "HTTP2" not in _run([curl, "-V"]).stdout:
        return
    answer = _run([curl, "--http2", "-sS", "--cacert", str(cert), "-o", "/dev/null",
                   "-w", "%{http_version}", f"https://127.0.0.1:{port}/healthz"])
    assert answer.stdout == "2", answer.stderr


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)


