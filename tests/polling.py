"""Bounded polling instead of sleeping (issue 11): a test that waits for a state to change
asks for that state, every 10 ms, for at most ``within`` seconds, and fails saying
what it waited for. A sleep either waits too long on a fast machine or not long enough
on a busy one; a poll returns the moment the state is there.

``until`` is the one helper; the gateway fixture's ``until`` (conftest.py) is this one.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

INTERVAL = 0.01  # seconds between two looks: far below any state change a test waits for


async def until(predicate: Callable[[], object | Awaitable[object]], within: float = 2.0,
                what: str | Callable[[], str] = "") -> None:
    """Return once ``predicate()`` (which may be async) is true; fail after ``within``
    seconds saying ``what`` it was waiting for (a callable: computed then)."""
    deadline = time.monotonic() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"not within {within} s: {said or predicate}")
        await asyncio.sleep(INTERVAL)
