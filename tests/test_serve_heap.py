"""A worker freezes its start-up heap once it listens (``server/serve.py``): a full
garbage collection of the unfrozen heap stalled the event loop for 22-44 ms every few
seconds at 1,000 req/s (issue 11, bench/RESULTS.md). ``serve`` runs here in-process with
its wait for signals replaced by a look at the collector, then returns."""

from __future__ import annotations

import gc

import pytest

from proxy.server import serve as serve_module
from tests.conftest import MakeConfig


async def test_serve_freezes_the_heap_before_it_waits_for_signals(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    gc.unfreeze()  # (whatever an earlier test left)
    seen: list[int] = []

    async def until_stopped(supervisor_pid: int | None, reload: object) -> None:
        seen.append(gc.get_freeze_count())

    monkeypatch.setattr(serve_module, "_until_stopped", until_stopped)
    config = make_config([], server={"port": 0})
    try:
        await serve_module.serve(config)
    finally:
        gc.unfreeze()  # the rest of the test process collects as usual
    assert len(seen) == 1 and seen[0] > 1000, seen  # the start-up objects, frozen
