"""Reading ``usage`` off every answer as it is relayed (issue 10, "Usage accounting").

:func:`ask_usage` runs before the upstream call: a stream whose client did not ask for
its usage is sent with ``stream_options.include_usage`` when every provider of its route
honours it (``Provider.asks_stream_usage``). :func:`tap` then wraps the answer's body
(``answers.Body``) in a :class:`JsonUsageTap` or an event stream's :class:`UsageTap`,
which fill ``record.usage`` for the access
log, the metrics and the accounting (``observe/accounting.py``), and settles a rate-limited
key's token estimate (``ratelimit.Admission``) before the body's end is passed on, so
the key's next request already sees the correction.

* A JSON answer is kept (up to ``MAX_JSON``) and read at its end, only when it mentions
  ``"usage"``: from its last ``"usage"`` on (one small parse), the whole body if needed.
  Unless a rate limit waits for the count, that read happens after the request, in the
  observers' batch (:func:`read_deferred`).
* In an event stream only ``data:`` lines whose ``usage`` is an object are parsed.
* Where the gateway asked for the usage, it takes out what that added, so the client
  gets exactly the provider's bytes without the option: ``"usage":null`` in each chunk
  and the last chunk with empty ``choices`` (OpenAI's behaviour). Only complete lines
  are passed on; a line is never held longer than until its newline arrives.
* Until a usage is reported, ``record.usage`` holds an estimate, kept current as the
  answer passes (``source`` "estimated"): the prompt by size (``ratelimit.estimate``)
  and one output token per ``data:`` event (an OpenAI-style stream sends about one token
  per event), or per 4 bytes of a JSON answer. A stream that ends early (client gone,
  upstream cut, deadline) keeps that estimate; ``record.ended`` says why.

A request a peer worker forwarded is not tapped: the worker facing the client strips and
counts it (``sharing/peers.py``), so nothing is taken out twice or counted twice.
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson

from proxy.answers import Answer, Body
from proxy.call import Call
from proxy.record import Record, Usage
from proxy.resilience.ratelimit import Admission, estimate
from proxy.routing import Route

MAX_JSON = 1024 * 1024  # a larger JSON answer is not held: its estimate stands
DEFER_JSON = 64 * 1024  # a JSON answer up to this is read after its request (observers)
_MAX_LINE = 64 * 1024  # a longer partial line is passed on, not held for stripping
_JSON_BYTES_PER_TOKEN = 4
# The endpoints whose answers carry token usage; only the first two take stream_options.
TOKEN_ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings", "responses"})
_STREAM_USAGE_ENDPOINTS = frozenset({"chat/completions", "completions"})
# What include_usage adds to each chunk, in the spellings servers use.
_NULL_USAGE = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')
_EMPTY_CHOICES = (b'"choices":[]', b'"choices": []')
# A JSON answer the upstream compressed (the client's Accept-Encoding goes upstream,
# and SDKs accept gzip) is inflated, a copy bounded by MAX_JSON, to read its usage.
_INFLATABLE = frozenset({"gzip", "x-gzip", "deflate"})


def ask_usage(call: Call, route: Route) -> None:
    """Ask upstream for a stream's usage its client did not ask for (see the module)."""
    payload = call.payload
    if not call.stream or payload is None or call.endpoint not in _STREAM_USAGE_ENDPOINTS:
        return
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return  # the upstream refuses it as it would without the gateway
    if options is not None and options.get("include_usage") is True:
        return
    if _route_asks(route):
        call.add_stream_usage()


def _route_asks(route: Route) -> bool:
    if route.single:
        return route.provider.asks_stream_usage
    return all(target.provider.asks_stream_usage
               for group in (route.deployments, *route.fallbacks) for target in group)


def tap(answer: Answer, call: Call, record: Record, admission: Admission | None) -> None:
    """Wrap ``answer``'s body to read its usage. An error answer costs no tokens: its
    estimate is given back when its body, already whole, is sent."""
    counted = call.endpoint in TOKEN_ENDPOINTS and not record.forwarded
    if answer.status >= 400:
        if admission is not None:
            answer.body = _GiveBack(answer.body, admission)
        return
    if not counted and admission is None:
        return
    guess: Usage | None = None
    if counted:
        guess = record.usage = Usage(input=estimate(None, call.body), output=0,
                                     source="estimated")
    coding = answer.headers.get("Content-Encoding")
    event_stream = answer.event_stream  # (a header lookup: read once)
    if coding is not None and (event_stream or coding.lower() not in _INFLATABLE):
        return  # a compressed stream, an unknown coding: the estimates stand
    if not event_stream:
        answer.body = JsonUsageTap(answer.body, record if counted else None, guess,
                                   admission, inflate=coding is not None)
        return
    strip = call.usage_added and counted and coding is None
    if strip:  # fewer bytes than the upstream's length: the stream goes chunked
        answer.headers.popall("Content-Length", None)
    answer.body = UsageTap(answer.body, record if counted else None, guess, admission, strip)


class _GiveBack:
    __slots__ = ("_admission", "_body")

    def __init__(self, body: Body, admission: Admission):
        self._body, self._admission = body, admission

    async def next(self) -> bytes | None:
        chunk = await self._body.next()
        if chunk is None:
            await self._admission.settle(0)
        return chunk


class JsonUsageTap:
    """A JSON answer's body, kept as it passes (up to ``MAX_JSON``) for the usage at
    its end. Unless a rate limit waits for the count, the usage of an answer up to
    ``DEFER_JSON`` is read after the request, in the observers' batch
    (:func:`read_deferred`), not on its path."""

    __slots__ = ("_admission", "_body", "_guess", "_inflate", "_parts", "_record", "_size")

    def __init__(self, body: Body, record: Record | None, guess: Usage | None,
                 admission: Admission | None, inflate: bool):
        self._body = body
        self._record = record
        self._guess = guess  # the estimate in record.usage until the usage is read
        self._admission = admission
        self._inflate = inflate
        self._parts: list[bytes] | None = []  # None: too large to hold, or read
        self._size = 0

    async def next(self) -> bytes | None:
        chunk = await self._body.next()
        if chunk is None:
            if self._parts is not None or self._admission is not None:
                await self._end()
            return None
        self._size += len(chunk)
        if self._guess is not None:
            self._guess.output = self._size // _JSON_BYTES_PER_TOKEN
        parts = self._parts
        if parts is not None:
            parts.append(chunk)
            if self._size > MAX_JSON:
                self._parts = None  # too large to hold: the estimate stands
        return chunk

    async def _end(self) -> None:
        parts, self._parts = self._parts, None
        total: int | None = None
        if parts:
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            if self._inflate:
                body = _inflated(body)
            record = self._record
            if record is not None and self._admission is None and len(body) <= DEFER_JSON:
                record.answer_json = body
            elif (found := read_usage(body)) is not None:
                usage, total = found
                if record is not None:
                    record.usage = usage
        admission, self._admission = self._admission, None
        if admission is not None:
            await admission.settle(total)


def read_deferred(records: list[Record]) -> None:
    """The first observer (``observe/observers.py``): the usage of the whole JSON answers the
    taps kept, read off the requests' path."""
    for record in records:
        body = record.answer_json
        if body is not None:
            record.answer_json = None
            if (found := read_usage(body)) is not None:
                record.usage = found[0]


class UsageTap:
    """An event stream, read for its usage as it passes (see the module doc)."""

    __slots__ = ("_admission", "_body", "_carry", "_done", "_guess", "_record",
                 "_skip_blank", "_strip", "_total")

    def __init__(self, body: Body, record: Record | None, guess: Usage | None,
                 admission: Admission | None, strip: bool):
        self._body = body
        self._record = record
        self._guess = guess  # the estimate in record.usage until a usage is reported
        self._admission = admission
        self._strip = strip
        self._carry = b""  # a partial line
        self._skip_blank = False  # a dropped event's blank line is still to come
        self._total: int | None = None  # total tokens reported, for the rate limits
        self._done = False

    async def next(self) -> bytes | None:
        if self._done:
            return None
        chunk = await self._body.next()
        if chunk is None:
            return await self._end()
        guess = self._guess
        if guess is not None and guess.output is not None:
            guess.output += chunk.count(b"data:")
        return self._rewrite(chunk) if self._strip else self._scan(chunk)

    def _scan(self, chunk: bytes) -> bytes:
        """Read usage off whole lines; the chunk itself passes untouched."""
        data = self._carry + chunk if self._carry else chunk
        cut = data.rfind(b"\n") + 1
        self._carry = data[cut:][-_MAX_LINE:] if cut < len(data) else b""
        if _has_usage_object(data, cut):
            for line in data[:cut].split(b"\n"):
                self._line(line)
        return chunk

    def _rewrite(self, chunk: bytes) -> bytes:
        """The whole lines so far, less what ``include_usage`` added."""
        data = self._carry + chunk if self._carry else chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) <= _MAX_LINE:
            self._carry = data
            return b""
        if cut == 0:  # a line too long to hold: passed on as it is, and no more stripping
            self._carry, self._strip = b"", False
            return data
        self._carry = data[cut:]
        whole = data[:cut] if cut < len(data) else data
        if not self._skip_blank:
            if b'"usage"' not in whole:
                return whole
            whole = whole.replace(_NULL_USAGE[0], b"")  # OpenAI's: in every chunk
            if b'"usage"' not in whole:
                return whole
        return self._strip_lines(whole.split(b"\n")[:-1])  # the usage chunk, say

    def _strip_lines(self, lines: list[bytes]) -> bytes:
        kept: list[bytes] = []
        for line in lines:
            if self._skip_blank:
                self._skip_blank = False
                if line in (b"", b"\r"):
                    continue
            if line.startswith(b"data:") and b'"usage"' in line:
                stripped = self._line(line, strip=True)
                if stripped is None:
                    self._skip_blank = True
                else:
                    kept.append(stripped)
                continue
            kept.append(line)
        return b"\n".join(kept) + b"\n" if kept else b""

    def _line(self, line: bytes, strip: bool = False) -> bytes | None:
        """Read one ``data:`` line's usage; with ``strip``, the line as the client gets
        it (None: the event is dropped)."""
        at = line.find(b'"usage"')
        if at < 0 or not line.startswith(b"data:"):
            return line
        value = line[at + 7:at + 16].lstrip(b": ")
        if value.startswith(b"null"):
            if strip:
                for added in _NULL_USAGE:
                    if added in line:
                        return line.replace(added, b"", 1)
            return line
        if not value.startswith(b"{"):
            return line
        self._reported(read_usage(line[5:]))
        if strip and any(empty in line for empty in _EMPTY_CHOICES):
            return None  # the usage chunk include_usage added
        return line

    def _reported(self, found: tuple[Usage, int] | None) -> None:
        if found is None:
            return
        usage, self._total = found
        if self._record is not None:
            self._record.usage = usage

    async def _end(self) -> bytes | None:
        """The body's end: the last partial line, the settlement."""
        self._done = True
        rest = b""
        if self._carry:
            carry, self._carry = self._carry, b""
            if self._strip:
                rest = self._strip_lines([carry]).removesuffix(b"\n")
            else:
                self._line(carry)
        if self._admission is not None:
            await self._admission.settle(self._total)
        return rest or None


def _inflated(body: bytes) -> bytes:
    """A gzip or zlib body's first ``MAX_JSON`` bytes; ``b""`` if it does not inflate."""
    try:
        return zlib.decompressobj(wbits=47).decompress(body, MAX_JSON)  # 47: either header
    except zlib.error:
        return b""


def _has_usage_object(data: bytes, end: int) -> bool:
    return data.find(b'"usage":{', 0, end) >= 0 or data.find(b'"usage": {', 0, end) >= 0


def read_usage(data: bytes) -> tuple[Usage, int] | None:
    """The usage a JSON object (an answer, a chunk, a Responses event) reports, and its
    total. Parses from the last ``"usage"`` on first (OpenAI puts it near the end; a
    ``"usage"`` inside a string would be escaped), the whole object only if needed."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return None
    try:
        tail = orjson.loads(b"{" + data[at:])
    except orjson.JSONDecodeError:
        tail = None
    usage = tail.get("usage") if isinstance(tail, dict) else None
    if not isinstance(usage, dict):
        usage = _whole_usage(data)
    return _usage(usage) if isinstance(usage, dict) else None


def _whole_usage(data: bytes) -> Any:
    try:
        whole = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(whole, dict):
        return None
    usage = whole.get("usage")
    response = whole.get("response")  # a Responses API event: response.completed
    if usage is None and isinstance(response, dict):
        usage = response.get("usage")
    return usage


def _usage(usage: dict[str, Any]) -> tuple[Usage, int] | None:
    """Chat/completions (prompt/completion) or Responses (input/output) fields."""
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _count(usage.get("completion_tokens", usage.get("output_tokens")))
    total = _count(usage.get("total_tokens"))
    if prompt is None and completion is None:
        return None
    prompt = prompt or 0
    if completion is None:  # embeddings: no completion, total = prompt
        completion = max((total or prompt) - prompt, 0)
    cached = _detail(usage, ("prompt_tokens_details", "input_tokens_details"), "cached_tokens")
    reasoning = _detail(usage, ("completion_tokens_details", "output_tokens_details"),
                        "reasoning_tokens")
    found = Usage(prompt, completion, cached, reasoning, "reported")
    return found, total if total is not None else prompt + completion


def _detail(usage: dict[str, Any], names: tuple[str, ...], field: str) -> int | None:
    for name in names:
        details = usage.get(name)
        if isinstance(details, dict):
            return _count(details.get(field))
    return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None
