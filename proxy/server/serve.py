"""Running a worker: the app on its sockets, until SIGINT or SIGTERM.

``running()`` is what the CLI and the tests both use, so tests exercise the same runner
settings as production: handler cancellation on (a client that disconnects cancels its
handler and so its upstream request), no access log on the hot path, and the client-side
limits and timeouts of ``server/guard.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import logging
import os
import resource
import signal
import socket as sock
import stat
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from proxy.app import build_app
from proxy.config.loader import DEMO_PROVIDER, Config, ConfigError, with_demo_provider
from proxy.config.worker import WorkerSpec
from proxy.gateway import Live
from proxy.observe.observers import OBSERVERS, Observers
from proxy.server.guard import GuardedRunner
from proxy.state import LIVE

log = logging.getLogger("proxy.server")


class CannotListen(Exception):
    """The address this worker must listen on is in use or not this host's: fatal (the
    CLI exits with ``EXIT_CANNOT_LISTEN``), as a restart would fail the same way. The
    message names the address, and is all an operator needs: no traceback."""

# How often a supervised worker checks that its supervisor is still alive (seconds).
ORPHAN_CHECK_SECONDS = 1.0
# Descriptors beyond sockets: listening sockets, the loop, logs, discovery, peers.
FD_HEADROOM = 64


@asynccontextmanager
async def running(config: Config, worker: WorkerSpec | None = None,
                  app: web.Application | None = None) -> AsyncIterator[str]:
    """Serve ``config`` on its host and port (0 picks a free one); yields the base URL.

    With several workers the TCP port is shared through ``SO_REUSEPORT`` (the kernel
    spreads connections over the workers). With ``socket_dir`` set, the worker also
    listens on its own unix socket, always: nginx and the other workers reach it there.
    """
    worker = worker or WorkerSpec.of(config)
    runner = GuardedRunner(app or build_app(config, worker), config.server,
                           handler_cancellation=True,
                           access_log=None, shutdown_timeout=config.server.shutdown_grace)
    await runner.setup()
    socket: _OwnSocket | None = None
    server = config.server
    try:
        site = web.TCPSite(runner, server.host, server.port,
                           reuse_port=True if worker.count > 1 else None)
        try:
            await site.start()
        except OSError as exc:
            raise CannotListen(_cannot_listen(f"{server.host}:{server.port}", exc)) from None
        host, port = runner.addresses[0][:2]
        if worker.socket_dir is not None:
            path = worker.socket_path(worker.index)
            try:
                socket = await _start_unix_site(runner, path, server.socket_mode)
            except OSError as exc:
                raise CannotListen(_cannot_listen(f"unix:{path}", exc)) from None
        yield f"http://{_url_host(host)}:{port}"
    finally:
        await runner.cleanup()
        if socket is not None:
            socket.remove()


@dataclass(frozen=True)
class _OwnSocket:
    """The socket file this worker created, identified by inode so that cleanup never
    removes a file some other process has put there since."""

    path: Path
    inode: int

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self.inode:
                self.path.unlink()


def check_port_free(host: str, port: int) -> None:
    """Before a supervisor starts its workers: ``CannotListen`` unless ``host:port`` can
    be bound *without* ``SO_REUSEPORT``. The workers share the port with it, and so would
    silently share it with another gateway started with ``--workers`` on the same port;
    this probe fails when any process listens there (``SO_REUSEADDR``, as asyncio sets
    it, only passes over connections in TIME_WAIT)."""
    where = f"{host}:{port}"
    try:
        addresses = set(sock.getaddrinfo(host or None, port, type=sock.SOCK_STREAM,
                                         flags=sock.AI_PASSIVE))
    except OSError as exc:
        raise CannotListen(_cannot_listen(where, exc)) from None
    probes: list[sock.socket] = []
    try:
        for family, kind, proto, _, address in addresses:
            probe = sock.socket(family, kind, proto)
            probes.append(probe)
            probe.setsockopt(sock.SOL_SOCKET, sock.SO_REUSEADDR, 1)
            if family == sock.AF_INET6:  # as asyncio binds it: IPv6 only
                probe.setsockopt(sock.IPPROTO_IPV6, sock.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise CannotListen(_cannot_listen(where, exc)) from None
    finally:
        for probe in probes:
            probe.close()


def _cannot_listen(where: str, exc: OSError) -> str:
    if isinstance(exc, sock.gaierror):
        reason = f"unknown host ({exc.strerror})"
    elif exc.errno == errno.EADDRINUSE:
        reason = "address already in use (another process listens on it)"
    elif exc.errno:
        reason = os.strerror(exc.errno)
    else:
        reason = str(exc)
    return f"cannot listen on {where}: {reason}"


async def _start_unix_site(runner: web.AppRunner, path: Path, mode: int) -> _OwnSocket:
    """Listen on ``path`` (start-up only, so the few blocking file calls are fine)."""
    _prepare_socket_path(path)
    await web.UnixSite(runner, str(path)).start()
    return _claim_socket(path, mode)


def _prepare_socket_path(path: Path) -> None:
    """A worker killed with SIGKILL leaves its socket file behind; its restart removes
    it. A socket someone still listens on is refused rather than stolen (two gateways
    configured with the same socket_dir), and a non-socket file is never deleted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise CannotListen(f"cannot listen on unix:{path}: it exists and is not a socket")
    with sock.socket(sock.AF_UNIX, sock.SOCK_STREAM) as probe:
        probe.settimeout(1.0)  # a live listener with a full backlog must not block us
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
        except OSError:
            pass  # busy (EAGAIN, timeout): someone is listening
    raise CannotListen(f"cannot listen on unix:{path}: another process listens on it")


def _claim_socket(path: Path, mode: int) -> _OwnSocket:
    """``server.socket_mode`` (0666 by default): nginx's workers, which run as another
    user, may connect. The TCP port is open to every local user anyway; gateway keys,
    not file modes, say who may use the gateway (README "Deployment behind nginx")."""
    path.chmod(mode)
    return _OwnSocket(path, path.stat().st_ino)


@asynccontextmanager
async def demo_upstream_if_needed(config: Config) -> AsyncIterator[Config]:
    """With no provider configured, serve from the bundled mock upstream (``bench/``),
    so the gateway answers chat completions offline, out of the box."""
    if config.providers:
        yield config
        return
    from proxy.mock.server import MockOptions, create_app  # noqa: PLC0415 - demo mode only

    runner = web.AppRunner(create_app(MockOptions(interval=0.05)), access_log=None,
                           handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield with_demo_provider(config, f"http://127.0.0.1:{port}/v1")
    finally:
        await runner.cleanup()


async def serve(given: Config, worker: WorkerSpec | None = None, *,
                supervisor_pid: int | None = None,
                load: Callable[[], Config] | None = None) -> None:
    """Run one worker until SIGINT or SIGTERM (or, when ``supervisor_pid`` is given,
    until that supervisor is gone: a worker must not outlive it and hold the port).
    SIGHUP calls ``load`` for a new config and puts it in force (``gateway.py``)."""
    worker = worker or WorkerSpec.of(given)
    me = f"worker {worker.index} (pid {os.getpid()})"
    raise_fd_limit(given)
    async with demo_upstream_if_needed(given) as config:
        app = build_app(config, worker)
        async with running(config, worker, app) as url:
            names = ", ".join(f"{p.name} ({p.type})" for p in config.providers)
            log.info("%s listening on %s; providers: %s; config: %s", me,
                     _listening_on(url, worker), names, config.source)
            if config.providers[0].name == DEMO_PROVIDER and config.source.startswith("defaults"):
                log.info("no provider configured: answering from the bundled mock upstream; "
                         "set OPENAI_API_KEY, use --upstream URL or a config file for real "
                         "models")
            reload = (functools.partial(_reload, app[LIVE], load, app[OBSERVERS]) if load
                      else None)
            freeze_startup_heap()
            await _until_stopped(supervisor_pid, reload)
    log.info("%s stopped", me)


def freeze_startup_heap() -> None:
    """Put what start-up made (modules, the config, the metric registry) out of the
    cyclic collector's reach, so a full collection walks only what was made since.
    Measured at 1,000 req/s against a 50 ms upstream (issue 11): a full collection of
    the unfrozen heap stalled the event loop for 20-27 ms, about every 8 s, delaying
    every request in flight; frozen, none took over 2 ms. What start-up made and a
    reload later drops (the first config's objects) stays allocated: one config's worth,
    once."""
    gc.collect()
    gc.freeze()


def raise_fd_limit(config: Config) -> None:
    """Raise the soft limit on open files to what ``max_connections`` client sockets plus
    ``pool.limit`` upstream ones need (the hard limit at most), as nginx's
    ``worker_rlimit_nofile`` does: a common default of 1024 would make the kernel refuse
    connections long before the gateway's own 503 ``too_many_connections`` applies."""
    needed = config.server.max_connections + config.pool.limit + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a cap below the reported hard limit (macOS)
            target = soft
    if target < needed:
        log.warning("open files limited to %d (hard limit); server.max_connections %d plus "
                    "pool.limit %d need %d: raise the hard limit (ulimit -Hn, LimitNOFILE=)",
                    target, config.server.max_connections, config.pool.limit, needed)


def _reload(live: Live, load: Callable[[], Config], observers: Observers) -> None:
    """SIGHUP: a config that fails validation, or that cannot be put in force (its
    file gone or empty, every gateway key dropped unsaid), is refused whole, with every
    reason logged, and the running one stays in force; in-flight requests are never
    touched. The requests already ended are observed first, under the config (the
    logging section) they were served with."""
    observers.flush()
    try:
        new = load()
        running_providers = live.gateway.config.providers
        if (not new.providers and running_providers
                and running_providers[0].name == DEMO_PROVIDER):
            new = with_demo_provider(new, running_providers[0].base_url)
        live.reload(new)
    except ConfigError as exc:
        log.error("reload refused, the running config stays in force: %s",
                  "; ".join(exc.problems))
        live.reloaded("refused")
    except Exception:  # a bug must not take a serving worker down
        log.exception("reload failed, the running config stays in force")
        live.reloaded("error")
    else:
        live.reloaded("success")


async def _until_stopped(supervisor_pid: int | None,
                         reload: Callable[[], None] | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # held since start-up
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ORPHAN_CHECK_SECONDS)
            if supervisor_pid is not None and os.getppid() != supervisor_pid:
                log.warning("supervisor (pid %d) is gone; stopping", supervisor_pid)
                stop.set()
    finally:
        # Stopping: a reload now has nothing to do, and must not kill the streams that
        # are finishing (SIGHUP's default action ends the process): blocked before its
        # handler goes, then ignored.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _listening_on(url: str, worker: WorkerSpec) -> str:
    if worker.socket_dir is None:
        return url
    return f"{url} and unix:{worker.socket_path(worker.index)}"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
