"""The shipped ``deploy/nginx.conf`` run by a real nginx in front of real workers, for
tests/test_nginx.py, test_nginx_dedup.py and test_http_safety_smuggling.py.

``behind_nginx(upstream, tmp_path)`` starts ``proxy serve --workers 2 --socket-dir
/run/proxy`` and nginx with the shipped file as shipped (only the marked certificate
paths and the port substituted, issue 9): a root master whose workers run as nginx's
default user. Runs are serialised by a lock file; ``needs_nginx`` skips a test where
nginx is missing. ``directives()`` is the file without its comments.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bench.procs import make_certificate
from proxy.config.worker import WorkerSpec
from tests.procs import Spawned, free_port, spawn, spawn_proxy, stop, wait_for_sockets

SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"


NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
     if os.access(p, os.X_OK)), None)


needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx not installed (.ci/run does it)")


SOCKET_DIR = Path("/run/proxy")  # as in the shipped file and the README's command


LOCK = Path(tempfile.gettempdir()) / "proxy-test-nginx.lock"


@contextmanager
def held_socket_dir() -> Iterator[Path]:
    """``/run/proxy``, held for this test alone: other runs of these tests wait on the
    lock (bounded); a gateway that is not a test's, listening there, skips the test."""
    if os.geteuid() != 0:
        pytest.skip("runs nginx as in production (a root master) and the gateway in "
                    "/run/proxy: needs root, as .ci/run has")
    with LOCK.open("w") as lock:
        deadline = time.monotonic() + 120
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{LOCK} held for 120 s by another run of the nginx tests")
                time.sleep(0.2)
        live = [p for p in WorkerSpec(0, 2, SOCKET_DIR).peers if _listened_on(p)]
        if live:
            pytest.skip(f"a gateway not started by this test listens on {live}")
        yield SOCKET_DIR


def _listened_on(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def directives() -> str:
    """The shipped file without its comments: a directive that is only mentioned in a
    comment does not count."""
    return "\n".join(line.split("#", 1)[0] for line in SHIPPED.read_text().splitlines())


def _sub(pattern: str, replacement: str, text: str) -> str:
    new, count = re.subn(pattern, lambda _: replacement, text, flags=re.MULTILINE)
    assert count, f"deploy/nginx.conf no longer has {pattern!r}: update this test"
    return new


def render_config(prefix: Path, port: int, cert: Path, key: Path) -> Path:
    """The shipped file with only its two REPLACE certificate paths and the listen port
    substituted."""
    text = SHIPPED.read_text()
    text = _sub(r"listen\s+443\b", f"listen 127.0.0.1:{port}", text)
    text = _sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {cert};", text)
    text = _sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", text)
    path = prefix / "nginx.conf"
    path.write_text(text)
    return path


@asynccontextmanager
async def nginx_running(conf: Path, prefix: Path, port: int) -> AsyncIterator[Spawned]:
    """``nginx -g 'daemon off;'`` in the foreground, ready on ``port``; stopped on exit.
    Root master, workers as nginx's default user: the file sets none (issue 9)."""
    assert NGINX is not None
    main = f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log info;"
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


@asynccontextmanager
async def behind_nginx(upstream: str, tmp_path: Path) -> AsyncIterator[Deployment]:
    """``proxy serve --workers 2 --socket-dir ... --upstream {upstream}/v1`` and nginx in
    front of it; both stopped on exit, their output printed (pytest shows it on failure)."""
    with held_socket_dir() as sockets:
        async with _deployed(upstream, tmp_path, sockets) as deployment:
            yield deployment


@asynccontextmanager
async def _deployed(upstream: str, tmp_path: Path, sockets: Path
                    ) -> AsyncIterator[Deployment]:
    cert, key = make_certificate(tmp_path)
    port = free_port()
    conf = render_config(tmp_path, port, cert, key)
    proxy = spawn_proxy(["--workers", "2", "--socket-dir", str(sockets), "--port",
                         str(free_port()), "--upstream", f"{upstream}/v1"], tmp_path)
    try:
        await wait_for_sockets(list(WorkerSpec(0, 2, sockets).peers), [proxy])
        async with nginx_running(conf, tmp_path, port) as nginx:
            yield Deployment(port, cert, tmp_path, proxy, nginx)
    finally:
        _show_outputs(proxy, tmp_path)
        await stop(proxy)


def _show_outputs(proxy: Spawned, prefix: Path) -> None:
    print(proxy.output())
    for name in ("nginx.log", "error.log", "nginx.conf"):
        path = prefix / name
        if path.exists():
            print(f"--- {name}:\n{path.read_text(errors='replace')}")
