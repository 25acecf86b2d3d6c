"""Reading ``usage`` off an answer as it is relayed, to correct a rate-limit estimate.

A :class:`UsageTap` wraps an answer's body (``answers.Body``) for a key with a tokens
per minute limit: chunks pass through untouched and at once; a JSON answer is kept (up
to ``MAX_JSON``) and parsed at its end, and in an event stream each ``data:`` line that
mentions ``usage`` is parsed (the final usage chunk of ``stream_options.include_usage``).
The correction is made before the body's end is passed on (an await: the buckets may be
shared, in Redis), so the client's next request already sees it.
"""

from __future__ import annotations

import orjson

from proxy.answers import Answer, Body
from proxy.ratelimit import Admission

MAX_JSON = 1024 * 1024
_MAX_LINE = 64 * 1024


class UsageTap:
    __slots__ = ("_admission", "_body", "_carry", "_json", "_size", "_sse", "_used")

    def __init__(self, body: Body, admission: Admission, event_stream: bool,
                 used: int | None = None):
        """``used`` known already (an error answer's 0): the body is not read for it."""
        self._body = body
        self._admission = admission
        self._sse = event_stream and used is None
        self._json: list[bytes] | None = None if event_stream or used is not None else []
        self._carry = b""
        self._size = 0
        self._used = used

    async def next(self) -> bytes | None:
        chunk = await self._body.next()
        if chunk is None:
            await self._finish()
        elif self._sse:
            self._scan(chunk)
        elif self._json is not None:
            self._json.append(chunk)
            self._size += len(chunk)
            if self._size > MAX_JSON:
                self._json = None  # too large to hold: the estimate stands
        return chunk

    def _scan(self, chunk: bytes) -> None:
        lines = (self._carry + chunk).split(b"\n")
        self._carry = lines.pop()[-_MAX_LINE:]
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                self._used = _total(line[5:]) or self._used

    async def _finish(self) -> None:
        if self._json is not None:
            self._used = _total(b"".join(self._json))
        await self._admission.settle(self._used)


def tap(answer: Answer, admission: Admission | None) -> None:
    """Wrap ``answer``'s body when its tokens must be counted; an error answer costs no
    tokens, so its estimate is given back (when its body, already whole, is sent)."""
    if admission is None:
        return
    used = 0 if answer.status >= 400 else None
    answer.body = UsageTap(answer.body, admission, answer.event_stream, used)


def _total(data: bytes) -> int | None:
    try:
        usage = orjson.loads(data).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) and total >= 0 else None
