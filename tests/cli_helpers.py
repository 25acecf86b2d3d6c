"""The real command line in subprocesses, for the CLI tests (tests/test_cli_*.py,
test_discovery.py): ``run_cli`` runs ``python -m proxy ARGS`` to its end, bounded;
``on_terminal`` runs it on a pseudo-terminal the test reads without blocking its loop
(the fake upstreams the child talks to run on that loop); ``models_upstream`` is one
fake provider's ``/v1/models``. The child never sees the caller's provider settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from tests.fake_upstream import FakeUpstream
from tests.procs import clean_env

UNSET = "CLI_CHECK_TEST_NEVER_SET"


def cli_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that configures providers or the server."""
    env = clean_env()
    env.pop(UNSET, None)
    return {**env, **extra}


async def run(*command: str, cwd: Path | None = None) -> tuple[int, str]:
    """Run ``command`` to its end (at most 20 s); (exit status, stdout)."""
    process = await asyncio.create_subprocess_exec(
        *command, env=cli_env(), cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), 20)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, stdout.decode()


async def run_cli(*args: str) -> tuple[int, str]:
    """``python -m proxy ARGS`` without the caller's provider settings; (exit, stdout)."""
    return await run(sys.executable, "-m", "proxy", *args)


def models_upstream(models: tuple[str, ...] = (), status: int = 200, latency: float = 0.0
                    ) -> FakeUpstream:
    """One fake provider (not yet started) whose ``/v1/models`` lists ``models``, or
    answers ``status``, after ``latency``; ``calls[MODELS]`` counts the listings."""
    fake = FakeUpstream(models)
    fake.models.status, fake.models.latency = status, latency
    return fake


WAIT = 20.0  # seconds any one step may take on a loaded 2-core machine


class Terminal:
    """A child process on a pseudo-terminal (stdin, stdout and stderr), read without
    blocking the test's loop: the fake upstreams the child talks to run on that loop."""

    def __init__(self, args: Sequence[str], env: dict[str, str], cwd: Path | None = None):
        self._fd, child = pty.openpty()
        try:
            self.process = subprocess.Popen(list(args), stdin=child, stdout=child,
                                            stderr=child, env=env, cwd=cwd,
                                            start_new_session=True)
        finally:
            os.close(child)
        self.output = bytearray()
        self._seen = 0
        self._eof = False
        self._changed = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except OSError:  # EIO: the child closed its side
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._eof = True
        self.output += data
        self._changed.set()

    async def expect(self, text: str) -> None:
        """Wait until ``text`` appears after what was already expected."""
        needle = text.encode()
        async with asyncio.timeout(WAIT):
            while (found := self.output.find(needle, self._seen)) < 0:
                assert not self._eof, f"{text!r} never came: {self.text()!r}"
                self._changed.clear()
                await self._changed.wait()
        self._seen = found + len(needle)

    def send(self, line: str) -> None:
        os.write(self._fd, line.encode() + b"\r")

    async def finish(self) -> int:
        """The exit status, once everything the child wrote was read."""
        async with asyncio.timeout(WAIT):
            while not self._eof:
                self._changed.clear()
                await self._changed.wait()
            return await asyncio.to_thread(self.process.wait)

    def text(self) -> str:
        return self.output.decode(errors="replace")

    def close(self) -> None:
        if not self._eof:
            asyncio.get_running_loop().remove_reader(self._fd)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        os.close(self._fd)


@contextlib.asynccontextmanager
async def on_terminal(*args: str, env: dict[str, str], cwd: Path | None = None
                      ) -> AsyncIterator[Terminal]:
    terminal = Terminal([sys.executable, "-m", "proxy", *args], env, cwd)
    try:
        yield terminal
    finally:
        terminal.close()
