"""What usage accounting costs per request (issue 10: under 10 % of the gateway's own
per-request CPU, about 200 us on the bench machine, bench/RESULTS.md): the tap
(``proxy/observe/usage.py``) and the accounting observer on a non-stream chat answer and on an
8-event stream the gateway asked for usage (so it strips it), against the same body
read untapped. In-process, no sockets: only the added work is measured.

    .venv/bin/python -m bench.usage_cost [--requests 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
from multidict import CIMultiDict

from proxy.answers import Answer, ReplayBody
from proxy.call import Call
from proxy.config.sections import UsageConfig
from proxy.observe.accounting import Accounting
from proxy.observe.usage import read_deferred, tap
from proxy.record import Record

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
USAGE = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
ANSWER = orjson.dumps({
    "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Hello from the mock upstream! You said: hi"}}],
    "usage": USAGE})
META = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


EVENTS = [*(_event({**META, "choices": [{"index": 0, "delta": {"content": f"w{i}"}}],
                    "usage": None}) for i in range(8)),
          _event({**META, "choices": [], "usage": USAGE}), b"data: [DONE]\n\n"]


async def per_request(count: int, stream: bool, tapped: bool) -> float:
    """Microseconds per request to read the answer (tapped: and account for it)."""
    accounting = Accounting(UsageConfig())
    kind = "text/event-stream" if stream else "application/json"
    headers = CIMultiDict({"Content-Type": kind})
    chunks = EVENTS if stream else [ANSWER]
    started = time.perf_counter()
    for _ in range(count):
        record = Record(0.0)
        answer = Answer(200, "OK", headers, ReplayBody(chunks))
        call = Call("POST", "chat/completions", "", BODY, {}, "m", stream, CIMultiDict(),
                    "r", usage_added=stream)
        if tapped:
            tap(answer, call, record, None)
        while await answer.body.next() is not None:
            pass
        if tapped:
            read_deferred([record])
            accounting.observe([record])
    return (time.perf_counter() - started) / count * 1e6


async def main(count: int) -> None:
    for stream, name in ((False, "non-stream JSON answer"), (True, "8-event stream, stripped")):
        await per_request(count // 10, stream, True)  # warm-up
        plain = min([await per_request(count, stream, False) for _ in range(3)])
        tapped = min([await per_request(count, stream, True) for _ in range(3)])
        print(f"{name}: {plain:.2f} us untapped, {tapped:.2f} us tapped: "
              f"+{tapped - plain:.2f} us per request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    asyncio.run(main(parser.parse_args().requests))
