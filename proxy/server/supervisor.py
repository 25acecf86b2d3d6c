"""``proxy serve --workers N``: N worker processes under one small supervisor.

Why processes: one Python event loop uses one core, so a gateway that must keep up with
the upstream on a many-core machine runs one loop per core. Each worker is a fresh
interpreter (``python -m proxy serve ... --worker-index I``) with its own loop, its own
upstream session and pool (STYLE.md point 12), and its own dedup map and cache: state
that differs per worker is said so in the README.

Two ways in, both always on when configured (issue #3, "Workers behind nginx"):

* TCP ``host:port`` shared by every worker with ``SO_REUSEPORT``: the Linux kernel
  spreads new connections over the workers' listening sockets;
* one unix socket per worker, ``<socket_dir>/worker-<I>.sock``, for nginx's ``upstream``
  block, and for workers to reach each other (``WorkerSpec.peers``).

The supervisor does not serve traffic and runs no event loop: it starts the workers,
restarts one that dies (with a backoff, so a worker that crashes at start-up does not
spin), and on SIGTERM or SIGINT forwards SIGTERM to every worker, waits for them
(bounded, then SIGKILL) and exits 0. Workers run in their own process group, so a
terminal's Ctrl-C reaches the supervisor only and each worker is stopped exactly once.
SIGHUP is forwarded to every worker, which reloads the config file itself.

A request one worker forwards to another (``sharing/peers.py``) proves where it comes from with
an HMAC keyed by a secret the supervisor makes at start-up and hands to its workers in
their environment (``PEER_SECRET_ENV``), never on a command line or in a log: nginx and
any local user may connect to the same sockets, and must not pass for a worker.

The workers' metrics live in files in one directory per gateway, summed by a scrape
on any worker (``observe/metrics_state.py``): the supervisor is told of each dead worker
(``on_exit``) so that its live gauges stop counting.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from signal import _HANDLER

log = logging.getLogger("proxy.workers")

# A worker exiting with one of these statuses would fail the same way if restarted, so
# the supervisor stops with it (the CLI's exit code convention): a configuration or
# usage error, or an address it cannot listen on (in use, or not this host's).
EXIT_CONFIG_ERROR = 2
EXIT_CANNOT_LISTEN = 3
FATAL_EXITS = {EXIT_CONFIG_ERROR: "configuration error", EXIT_CANNOT_LISTEN: "cannot listen"}
# The supervisor's per-start secret, in each worker's environment only (cli/main.py reads it
# once and removes it).
PEER_SECRET_ENV = "PROXY_PEER_SECRET"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class Backoff:
    """Delay before restarting a worker: ``initial`` doubling to ``maximum``, and back to
    ``initial`` once a worker has lived ``healthy_after`` seconds (a crash loop slows
    down; a worker that dies once after a long life comes back at once)."""

    initial: float = 0.5
    maximum: float = 10.0
    healthy_after: float = 30.0
    current: float = 0.5

    def next_delay(self, lived: float) -> float:
        if lived >= self.healthy_after:
            self.current = self.initial
        delay = self.current
        self.current = min(self.current * 2, self.maximum)
        return delay


@dataclass
class _Slot:
    """One worker index: its live process, or when it is due to be started again."""

    index: int
    backoff: Backoff
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    start_at: float = 0.0  # monotonic time to (re)start it when ``process`` is None
    restarts: int = 0


class Supervisor:
    """Runs ``command(i)`` for each worker index until SIGTERM/SIGINT; see the module
    docstring. ``run()`` blocks the calling (main) thread and returns the exit code."""

    def __init__(self, command: Callable[[int], Sequence[str]], count: int, *,
                 stop_timeout: float = 30.0, backoff: Callable[[], Backoff] = Backoff,
                 env: Mapping[str, str] | None = None,
                 on_exit: Callable[[int], None] | None = None):
        self._command = command
        self._env = env  # the workers' environment (None: this process's)
        self._on_exit = on_exit  # told each dead worker's pid (its metrics files)
        self._stop_timeout = stop_timeout
        self._slots = [_Slot(index=i, backoff=backoff()) for i in range(count)]
        self._stopping = False
        self._reload = False
        self._stop_signal = ""
        self._exit_code = 0

    def __repr__(self) -> str:
        pids = [s.process.pid if s.process else None for s in self._slots]
        return f"<Supervisor pid={os.getpid()} workers={pids} stopping={self._stopping}>"

    def run(self) -> int:
        wake_read, wake_write = os.pipe()
        for fd in (wake_read, wake_write):
            os.set_blocking(fd, False)
        previous_wakeup = signal.set_wakeup_fd(wake_write)
        previous = self._install_signals()
        try:
            while not self._stopping:
                now = time.monotonic()
                self._reap(now)
                self._start_due(now)
                if self._reload:
                    self._forward_reload()
                _wait_for_wakeup(wake_read, self._next_timeout(now))
            self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous_wakeup)
            os.close(wake_read)
            os.close(wake_write)
        return self._exit_code

    def _install_signals(self) -> dict[signal.Signals, _HANDLER]:
        """SIGTERM/SIGINT set the stop flag; SIGCHLD only wakes the loop. Python writes
        every handled signal to the wakeup fd, so ``select`` returns at once for any of
        them (no polling delay between a worker's death and its restart)."""
        previous = {sig: signal.signal(sig, self._on_stop_signal) for sig in STOP_SIGNALS}
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, _ignore)
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_reload_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # held since start-up
        return previous

    def _on_reload_signal(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True

    def _forward_reload(self) -> None:
        """SIGHUP: every worker reloads the config file itself (``server._reload``); a
        worker that is restarting reads the new file anyway."""
        self._reload = False
        live = [s.process for s in self._slots if s.process is not None]
        log.info("supervisor (pid %d): SIGHUP, asking %d workers to reload the config",
                 os.getpid(), len(live))
        for process in live:
            if process.poll() is None:
                process.send_signal(signal.SIGHUP)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        """Only sets the flag: the main loop logs and acts (no I/O in a signal handler)."""
        self._stop_signal = self._stop_signal or signal.Signals(signum).name
        self._stopping = True

    def _reap(self, now: float) -> None:
        for slot in self._slots:
            if slot.process is None or (status := slot.process.poll()) is None:
                continue
            lived = now - slot.started_at
            delay = slot.backoff.next_delay(lived)
            if status in FATAL_EXITS:
                log.error("worker %d (pid %d) exited with status %d (%s); stopping all "
                          "workers", slot.index, slot.process.pid, status, FATAL_EXITS[status])
                self._stopping, self._exit_code = True, status
            else:
                log.warning("worker %d (pid %d) died (%s) after %.1f s; restarting it in "
                            "%.1f s", slot.index, slot.process.pid, describe_exit(status),
                            lived, delay)
            if self._on_exit is not None:
                self._on_exit(slot.process.pid)
            slot.process, slot.start_at = None, now + delay
            slot.restarts += 1

    def _start_due(self, now: float) -> None:
        for slot in self._slots:
            if slot.process is None and slot.start_at <= now and not self._stopping:
                self._start(slot, now)

    def _start(self, slot: _Slot, now: float) -> None:
        command = list(self._command(slot.index))
        try:
            # Own process group: the terminal's Ctrl-C goes to the supervisor only. SIGHUP
            # is blocked across the exec: the worker holds a reload until its handler is
            # in place instead of dying of it (its default action).
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
            try:
                slot.process = subprocess.Popen(command, process_group=0, env=self._env)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
        except OSError as exc:
            delay = slot.backoff.next_delay(0.0)
            log.error("worker %d: cannot start %s (%s); retrying in %.1f s", slot.index,
                      command[0], exc, delay)
            slot.start_at = now + delay
            return
        slot.started_at = now
        again = f" (restart {slot.restarts})" if slot.restarts else ""
        log.info("supervisor (pid %d): started worker %d, pid %d%s", os.getpid(), slot.index,
                 slot.process.pid, again)

    def _next_timeout(self, now: float) -> float:
        """Sleep until the next scheduled restart; child exits and signals wake us up
        earlier. The 1 s ceiling only guards against a lost wakeup."""
        due = [s.start_at - now for s in self._slots if s.process is None]
        return max(0.0, min([1.0, *due]))

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait up to ``stop_timeout`` in total, SIGKILL the rest."""
        live = [s.process for s in self._slots if s.process is not None]
        log.info("supervisor (pid %d): %s, stopping %d workers", os.getpid(),
                 self._stop_signal or "a worker failed", len(live))
        for process in live:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_timeout
        for process in live:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop within %.0f s; killing it",
                            process.pid, self._stop_timeout)
                process.kill()
                process.wait()
        log.info("supervisor (pid %d): all workers stopped", os.getpid())


def describe_exit(status: int) -> str:
    """``exit status 1`` or ``killed by SIGKILL`` (Popen's negative return codes)."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def _wait_for_wakeup(fd: int, timeout: float) -> None:
    select.select([fd], [], [], timeout)
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _ignore(signum: int, frame: FrameType | None) -> None:
    """SIGCHLD handler: the wakeup fd already woke the loop, which reaps the child."""
