"""The request's value types: what the handler understood of a client's request.

Kept at the top of the tree and importing nothing of the gateway, so that every step of
the data path (routing, sharing, dispatch, providers, usage) can take a ``Call`` without
an import pointing back up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from multidict import CIMultiDict


@dataclass(slots=True)
class Call:
    """One client request as the handler understood it, before any provider touched it."""

    method: str
    endpoint: str  # the path after "/v1/", e.g. "chat/completions"
    query: str  # the raw query string, "" when none
    body: bytes
    payload: dict[str, Any] | None  # the parsed JSON body, when it is a JSON object
    model: str | None  # as the client sent it
    stream: bool
    headers: CIMultiDict[str]  # end-to-end client headers plus X-Forwarded-*, X-Request-ID
    request_id: str
    upstream_model: str | None = None  # set by routing
    # Who sent it, for the circuit breaker's distinct callers: a gateway key's name, a
    # hash of the client's Authorization, or its address; never a secret.
    caller: str = ""
    # The gateway added ``stream_options.include_usage`` to ``payload`` (``observe/usage.py``):
    # what it adds to the answer is taken out again before the client sees it.
    usage_added: bool = False

    def body_for_upstream(self) -> bytes:
        """The body to send: the client's bytes untouched unless the model name changes
        (a ``provider/`` prefix or an alias) or the gateway asked for a stream's usage,
        the only cases that re-serialise."""
        if self.payload is None:
            return self.body
        if self.upstream_model not in (None, self.model):
            return orjson.dumps({**self.payload, "model": self.upstream_model})
        return orjson.dumps(self.payload) if self.usage_added else self.body

    def add_stream_usage(self) -> None:
        """Ask upstream for the stream's usage (``stream_options.include_usage``) the
        client did not ask for, keeping its other stream options."""
        assert self.payload is not None
        options = self.payload.get("stream_options")
        options = options if isinstance(options, dict) else {}
        self.payload = {**self.payload, "stream_options": {**options, "include_usage": True}}
        self.usage_added = True
