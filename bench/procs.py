"""The processes a benchmark run starts and stops: the proxies under test, their upstream,
and minimal nginx instances (``bench/compare.py``, ``bench/compression.py``...).

A :class:`Process` is only ever one this run started; it is stopped by its own PID
(SIGTERM, then SIGKILL after ``STOP_TIMEOUT``). CPU time and RSS are read from /proc.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
_TICK = os.sysconf("SC_CLK_TCK")


class Process:
    """A child this run started (the only kind it ever stops), with its log file."""

    def __init__(self, name: str, argv: list[str], workdir: Path, core: int | None,
                 code: Path = REPO) -> None:
        """``code``: the source tree whose ``proxy``/``bench`` the child imports (another
        checkout's, for a before/after comparison in one run)."""
        self.name, self.log = name, workdir / f"{name}.log"
        prefix = ["taskset", "-c", str(core)] if core is not None else []
        env = {**os.environ, "PYTHONPATH": str(code)}
        with self.log.open("wb") as log:  # the child keeps its own copy of the descriptor
            self.popen = subprocess.Popen(  # taskset execs: the pid is the program's
                prefix + argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> list[int]:
        """This process and its children (nginx's worker), read from /proc."""
        pid = self.popen.pid
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            return [pid, *map(int, children)]
        return [pid]

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return round(total / 1024, 1)

    def cpu_seconds(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / _TICK

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_TIMEOUT)


def free_port() -> int:
    """A port free right now on 127.0.0.1 (the kernel picks it; the child binds it next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(proc: Process, url: str, body: bytes | None = None) -> None:
    """Poll ``url`` until it answers 200, the process exits, or 20 s pass. With ``body``
    each poll is a JSON POST of it (a target with no GET route, ``bench/hello_app.py``)."""
    deadline = time.monotonic() + READY_TIMEOUT
    headers = {"Content-Type": "application/json"} if body is not None else {}
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        poll = urllib.request.Request(url, data=body, headers=headers)
        with contextlib.suppress(OSError), urllib.request.urlopen(poll, timeout=1.0) as answer:
            if answer.status == 200:  # URLError and HTTPError are OSErrors
                return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready after {READY_TIMEOUT:g} s:\n{proc.tail()}")


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    return found or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def nginx_argv(workdir: Path, name: str, port: int, location: str, extra: str = "") -> list[str]:
    """Command line of one minimal nginx (one worker, no access log) in its own prefix."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("no nginx binary on PATH or at /usr/sbin/nginx")
    prefix = workdir / name
    prefix.mkdir()
    temp = " ".join(f"{kind}_temp_path {prefix}/{kind};"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(
        f"worker_processes 1; error_log {prefix}/error.log warn; pid {prefix}/nginx.pid;\n"
        f"events {{ worker_connections 4096; }}\n"
        f"http {{ access_log off; {temp} keepalive_requests 1000000; {extra}\n"
        f"  server {{ listen 127.0.0.1:{port}; client_max_body_size 32m;\n"
        f"    location / {{ {location} }} }} }}\n")
    return [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"]


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 and localhost (for nginx in
    front of the gateway, in bench/dedup.py and the nginx tests)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=20)
    return cert, key
