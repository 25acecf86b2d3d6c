"""The shipped ``deploy/nginx.conf``, run by a real nginx in front of two real workers.

Issue #3: "An integration test starts a real nginx ... with that config and a throwaway
self-signed certificate in front of 2 workers, and sends HTTPS requests through it:
non-stream and stream. It proves both workers serve traffic and that a stream's first
chunk reaches the client before the upstream has finished (nginx does not buffer it)."

The file is used as shipped; only what must differ in a test is substituted (certificate
paths, the socket directory, a free loopback port, and the paths a non-root nginx can
write), plus an access log naming the worker socket each request went to (observation
only: it changes no routing). Skipped only when no nginx binary exists; ``.ci/run``
installs one.

Also the dedup target of issue #3: "50 identical concurrent requests (temperature 0)
against a 200 ms upstream -> 1 upstream call, also when they arrive through the shipped
nginx config in front of 2 workers".
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.config import ServerConfig, Timeouts
from proxy.workers import WorkerSpec
from tests.conftest import StartUpstream
from tests.test_workers import (
    Spawned,
    free_port,
    poll_healthz,
    spawn,
    spawn_proxy,
    stop,
    wait_for_sockets,
)

SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
     if os.access(p, os.X_OK)), None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx not installed (.ci/run does it)")
MESSAGES = [{"role": "user", "content": "hi"}]
ACCESS_LOG = "access.log"
ACCESS_FORMAT = "    log_format upstreams '$http_x_request_id $upstream_addr $status';\n"


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short directory for the workers' unix sockets (paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="proxy-sock-") as path:
        yield Path(path)


def directives() -> str:
    """The shipped file without its comments: a directive that is only mentioned in a
    comment does not count."""
    return "\n".join(line.split("#", 1)[0] for line in SHIPPED.read_text().splitlines())


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


def _sub(pattern: str, replacement: str, text: str) -> str:
    new, count = re.subn(pattern, lambda _: replacement, text, flags=re.MULTILINE)
    assert count, f"deploy/nginx.conf no longer has {pattern!r}: update this test"
    return new


def render_config(prefix: Path, port: int, socket_dir: Path, cert: Path, key: Path) -> Path:
    """The shipped file with only the test's paths and port substituted."""
    text = SHIPPED.read_text()
    text = _sub(r"listen\s+443\b", f"listen 127.0.0.1:{port}", text)
    text = _sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", text)
    text = _sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", text)
    text = _sub(r"unix:/run/proxy/", f"unix:{socket_dir}/", text)
    # A non-root nginx cannot write the compiled-in temp paths (/var/lib/nginx/...).
    temp = "".join(f"    {kind}_temp_path {prefix}/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = _sub(r"^http\s*\{\n", "http {\n" + temp + ACCESS_FORMAT, text)
    # Observation only: which worker socket nginx picked for each request (a server-level
    # access_log overrides the shipped http-level `access_log off`).
    text = _sub(r"^\s*server\s*\{\n",
                f"    server {{\n        access_log {prefix}/{ACCESS_LOG} upstreams;\n", text)
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=20)
    return cert, key


def gated_upstream(release: asyncio.Event, finished: asyncio.Event,
                   seen: list[CIMultiDict[str]]) -> web.Application:
    """Answers chat; a streamed answer sends its first event, then waits for ``release``
    (set by the test only once that event has reached the client through nginx)."""
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


@asynccontextmanager
async def nginx_running(conf: Path, prefix: Path, port: int) -> AsyncIterator[Spawned]:
    """``nginx -g 'daemon off;'`` in the foreground, ready on ``port``; stopped on exit."""
    assert NGINX is not None
    main = f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log info;"
    if os.geteuid() == 0:  # as root nginx's workers would switch to "nobody"
        main += " user root;"
    nginx = spawn("nginx", [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"),
                            "-c", str(conf), "-g", main], prefix)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                await writer.wait_closed()
                break
            except OSError:
                if nginx.process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"nginx did not start\n{nginx.output()}\n"
                                + (prefix / "error.log").read_text(errors="replace"))
                await asyncio.sleep(0.05)
        yield nginx
    finally:
        await stop(nginx)


@dataclass
class Deployment:
    """2 workers (``--socket-dir``) behind nginx running the shipped config, on loopback."""

    port: int
    cert: Path
    prefix: Path
    proxy: Spawned
    nginx: Spawned

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.tls()),
            timeout=aiohttp.ClientTimeout(total=15))

    def access_log(self) -> list[list[str]]:
        """``[request id, worker socket path(s), status]`` for every request nginx has
        finished (the test's ``upstreams`` log format)."""
        path = self.prefix / ACCESS_LOG
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@asynccontextmanager
async def behind_nginx(upstream: str, tmp_path: Path, sockets: Path
                       ) -> AsyncIterator[Deployment]:
    """``proxy serve --workers 2 --socket-dir ... --upstream {upstream}/v1`` and nginx in
    front of it; both stopped on exit, their output printed (pytest shows it on failure)."""
    cert, key = make_certificate(tmp_path)
    port = free_port()
    conf = render_config(tmp_path, port, sockets, cert, key)
    proxy = spawn_proxy(["--workers", "2", "--socket-dir", str(sockets), "--port",
                         str(free_port()), "--upstream", f"{upstream}/v1"], tmp_path)
    try:
        await wait_for_sockets(list(WorkerSpec(0, 2, sockets).peers), [proxy])
        async with nginx_running(conf, tmp_path, port) as nginx:
            yield Deployment(port, cert, tmp_path, proxy, nginx)
    finally:
        _show_outputs(proxy, tmp_path)
        await stop(proxy)


@needs_nginx
async def test_https_through_nginx_to_two_workers(
    start_upstream: StartUpstream, tmp_path: Path, sockets: Path
) -> None:
    release, finished = asyncio.Event(), asyncio.Event()
    seen: list[CIMultiDict[str]] = []
    upstream = await start_upstream(gated_upstream(release, finished, seen))
    async with AsyncExitStack() as stack:
        deployment = await stack.enter_async_context(behind_nginx(upstream, tmp_path, sockets))
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


def _show_outputs(proxy: Spawned, prefix: Path) -> None:
    print(proxy.output())
    for name in ("nginx.log", "error.log", ACCESS_LOG, "nginx.conf"):
        path = prefix / name
        if path.exists():
            print(f"--- {name}:\n{path.read_text(errors='replace')}")


# -- dedup through nginx (issue #3, "Targets")

BURST = 50
Reply = tuple[int, str, bytes]  # status, X-Gateway-Dedup, body


def counting_upstream(calls: list[str]) -> web.Application:
    """A 200 ms chat upstream that records each call's prompt and numbers its answers, so
    answers from two different calls never have identical bodies."""
    async def chat(request: web.Request) -> web.Response:
        prompt = (await request.json())["messages"][0]["content"]
        calls.append(prompt)
        number = len(calls)
        await asyncio.sleep(0.2)
        return web.json_response({"id": f"c{number}", "object": "chat.completion",
                                  "model": "m", "created": 0, "choices": []})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


async def burst(deployment: Deployment, tag: str, prompt: str,
                extra: dict[str, str]) -> list[Reply]:
    """``BURST`` identical chat requests (temperature 0), each on its own HTTPS connection
    to nginx. Every connection is opened (TLS done) first, then every request is written
    in one synchronous loop: the upstream runs on this test's event loop, so its 200 ms
    cannot start before all of them are on the wire. HTTP/1.0: nginx closes each
    connection after its answer, so a reply is everything read until EOF."""
    body = orjson.dumps({"model": "m", "temperature": 0,
                         "messages": [{"role": "user", "content": prompt}]})
    streams = await asyncio.gather(*(
        asyncio.open_connection("127.0.0.1", deployment.port, ssl=deployment.tls())
        for _ in range(BURST)))
    try:
        for i, (_, writer) in enumerate(streams):
            headers = {"Host": f"127.0.0.1:{deployment.port}", "X-Request-ID": f"{tag}-{i}",
                       "Content-Type": "application/json", "Content-Length": str(len(body)),
                       **extra}
            head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            writer.write(f"POST /v1/chat/completions HTTP/1.0\r\n{head}\r\n".encode() + body)
        raw = await asyncio.wait_for(
            asyncio.gather(*(reader.read() for reader, _ in streams)), 10)
    finally:
        for _, writer in streams:
            writer.transport.abort()
    return [_parse_reply(data) for data in raw]


def _parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = CIMultiDict((name, value.strip())
                          for name, _, value in (line.partition(":") for line in lines))
    return int(status_line.split()[1]), headers.get("X-Gateway-Dedup", ""), body


async def workers_used(deployment: Deployment, tag: str) -> set[str]:
    """The worker sockets nginx sent the burst ``tag`` to, from its access log (bounded
    wait: nginx logs a request as it finishes it)."""
    deadline = time.monotonic() + 2
    while True:
        entries = [e for e in deployment.access_log() if e[0].startswith(f"{tag}-")]
        if len(entries) == BURST or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert len(entries) == BURST and {e[-1] for e in entries} == {"200"}, entries
    return {Path(e[1]).name for e in entries}


@needs_nginx
async def test_identical_requests_through_nginx_make_one_upstream_call(
    start_upstream: StartUpstream, tmp_path: Path, sockets: Path
) -> None:
    calls: list[str] = []
    upstream = await start_upstream(counting_upstream(calls))
    async with behind_nginx(upstream, tmp_path, sockets) as deployment:
        started = time.monotonic()
        replies = await burst(deployment, "shared", "same question", {})
        elapsed = time.monotonic() - started
        # least_conn gives concurrent requests to the less busy worker: both got some,
        # so without cross-worker forwarding each would have called the upstream.
        assert await workers_used(deployment, "shared") == {"worker-0.sock", "worker-1.sock"}
        assert [status for status, _, _ in replies] == [200] * BURST, replies[0]
        assert {body for _, _, body in replies} == {replies[0][2]}
        assert orjson.loads(replies[0][2])["id"] == "c1"
        assert sorted(role for _, role, _ in replies) == ["follower"] * (BURST - 1) + ["leader"]
        assert calls == ["same question"]
        assert elapsed < 5, f"the burst took {elapsed:.2f} s"

        # The control: `X-Gateway-Peer: 1` turns cross-worker forwarding off for a request,
        # so each worker deduplicates only what it received: one call per worker used.
        replies = await burst(deployment, "local", "other question", {"X-Gateway-Peer": "1"})
        used = await workers_used(deployment, "local")
        assert [status for status, _, _ in replies] == [200] * BURST, replies[0]
        assert calls[1:] == ["other question"] * len(used)
        assert len({body for _, _, body in replies}) == len(used)
        roles = [role for _, role, _ in replies]
        assert (roles.count("leader"), roles.count("follower")) == (len(used), BURST - len(used))
