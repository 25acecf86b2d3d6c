"""What one request did, written down as it travels, read once when it ends.

``core.Core`` starts a :class:`Record` for every request (before the middlewares), the
steps below fill in what they learn (the handler the caller, model and route, the
dispatcher where the answer came from, ``streaming`` how it ended), and when the
request is over the record is handed to the app's observers (``observe/observers.py``): the
access log, the metrics and usage accounting (issue 10). One object instead of each
observer hooking every step: the hot path pays for a few attribute writes, and the
observers agree on what happened.

Only bounded, non-secret values go in: a gateway key by its configured name, labels
from the config, never the caller's ``Authorization``.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from dataclasses import dataclass

# How a request ended (the metrics' ``reason`` label).
COMPLETED = "completed"
CLIENT_DISCONNECT = "client_disconnect"
UPSTREAM_ERROR = "upstream_error"
TIMEOUT = "timeout"


@dataclass(slots=True)
class Origin:
    """Where an answer came from, carried on the ``Answer`` (and a shared exchange's
    head, so that every follower learns it too)."""

    provider: str
    upstream_model: str | None
    attempts: int = 1  # upstream tries, retries and failover legs included
    taken: str | None = None  # "failover" (another deployment) or "fallback" (model)


@dataclass(slots=True)
class Usage:
    """Tokens one answer used, as the provider reported them (or as estimated)."""

    input: int | None = None
    output: int | None = None
    cached: int | None = None  # of the input, served from the provider's prompt cache
    reasoning: int | None = None  # of the output
    source: str = "reported"  # or "estimated", when no usage came back


@dataclass(slots=True)
class Record:
    """One request, from the first middleware to its last byte (see the module doc)."""

    started: float  # time.perf_counter() when the gateway got the request
    method: str = ""
    path: str = ""  # the route's label, bounded: "/v1/chat/completions", "other"...
    request_id: str = ""
    client: str | None = None
    key_name: str | None = None  # the gateway key's configured name, never the secret
    model: str | None = None  # as the client asked
    stream: bool = False
    origin: Origin | None = None
    cache: str | None = None  # "hit" | "miss"
    dedup: str | None = None  # "leader" | "follower"
    peer: bool = False  # answered by the worker owning the request's key (sharing/peers.py)
    # Forwarded here by the worker the client reached, which counts and logs it as the
    # client's request: observers here count only what happened here (upstream tries).
    forwarded: bool = False
    status: int = 0
    error_code: str | None = None
    upstream_status: int | None = None
    ended: str = COMPLETED
    upstream_wait: float = 0.0  # seconds waited on upstreams (queue, backoff, answer)
    first_byte: float | None = None  # perf_counter when the answer's head was sent
    finished: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0  # the answer's body as sent (chunk framing and gzip included)
    head_bytes: int = 0  # a streamed answer's head, written before its body
    usage: Usage | None = None
    # A whole JSON answer whose usage is still to be read: off the request's path, by
    # the observers' batch (``usage.read_deferred``), which then drops it.
    answer_json: bytes | None = None
    # Headers every answer carries besides its own: a rate-limited key's x-ratelimit-*.
    reply_headers: dict[str, str] | None = None

    def stamp(self, headers: MutableMapping[str, str]) -> None:
        """Put on an answer's head, just before it is sent (a whole answer by
        ``core.Core``, a streamed one by ``streaming.send_answer``): the request id, the
        ``reply_headers``, and the gateway's own time so far, so users see the overhead
        on their own traffic."""
        headers["X-Request-ID"] = self.request_id
        if self.reply_headers is not None:
            headers.update(self.reply_headers)
        headers["X-Gateway-Overhead-Ms"] = f"{self.overhead_ms():.3f}"

    def overhead_ms(self) -> float:
        """The gateway's own time so far: everything but the wait for upstreams."""
        return (time.perf_counter() - self.started - self.upstream_wait) * 1000

    def overhead(self) -> float:
        """Seconds the gateway itself spent before the answer's first byte (what
        ``X-Gateway-Overhead-Ms`` said): a stream's later chunks come at the upstream's
        pace, so they are not overhead."""
        end = self.first_byte if self.first_byte is not None else self.finished
        return max(end - self.started - self.upstream_wait, 0.0)

    @property
    def provider(self) -> str | None:
        return self.origin.provider if self.origin is not None else None

    def duration(self) -> float:
        """Seconds from the request's arrival to its end (once ``finished`` is set)."""
        return self.finished - self.started

    def time_to_first_byte(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.started


# The endpoints named in logs and metrics as themselves; any other path under /v1/ is
# "/v1/other" (a label must never take a value the client chose).
NAMED_ENDPOINTS = frozenset({
    "chat/completions", "completions", "embeddings", "responses", "moderations",
    "images/generations", "audio/speech", "audio/transcriptions", "audio/translations",
    "rerank", "files", "batches", "models", "usage"})


def endpoint_label(endpoint: str) -> str:
    """The route label of ``/v1/<endpoint>`` (``endpoint`` as the client sent it)."""
    return f"/v1/{endpoint}" if endpoint in NAMED_ENDPOINTS else "/v1/other"
