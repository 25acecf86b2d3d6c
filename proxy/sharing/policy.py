"""Which requests may share an upstream call or a cached answer, and under what key.

Two identical requests with ``temperature`` > 0 may be meant as two independent samples,
so by default only *deterministic* requests are shared: ``temperature`` 0, a ``seed``, or
an embeddings request. ``dedup.mode: all`` shares every identical request (cheaper, but
identical sampled requests then get the same sample); ``off`` shares none. Clients opt
out per request with ``X-Gateway-Dedup: off`` and control the cache with
``Cache-Control: no-cache`` (do not read it), ``no-store`` (neither read nor write) and
``X-Gateway-Cache: on`` (cache a non-deterministic request) or ``off``.

The key covers everything that changes the answer: the caller's identity (so two
tenants never share an answer: its gateway key's name, the same in the worker a request
reached and in the one it is forwarded to), the provider, method, path and query, and the body
canonicalised (orjson, sorted keys) and hashed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from multidict import CIMultiDictProxy

from proxy.call import Call
from proxy.config.sections import CacheConfig, DedupConfig
from proxy.headers import AUTHORIZATION, CACHE_OPT, DEDUP_OPT, PEER, PEER_KEY


@dataclass(frozen=True, slots=True)
class Sharing:
    key: bytes | None  # None: the request is answered on its own
    dedup: bool = False
    cache_read: bool = False
    cache_write: bool = False
    # May go to the worker that owns the key (peers.py): not when a peer sent it here.
    forwardable: bool = False
    # For a peer: the client's CONTROL_HEADERS, and its gateway key's name (PEER_KEY).
    control: tuple[tuple[str, str], ...] = ()

    @property
    def records(self) -> bool:
        """The answer must be recorded (to share it or to cache it)."""
        return self.dedup or self.cache_write


ALONE = Sharing(key=None)
_BILLING_HEADERS = ("OpenAI-Organization", "OpenAI-Project")
# The client's own sharing instructions, which go with a request forwarded to the worker
# that owns its key (peers.py) but never upstream (headers.py).
CONTROL_HEADERS = (CACHE_OPT, DEDUP_OPT)


def sharing_for(call: Call, provider: str, client_headers: CIMultiDictProxy[str],
                dedup: DedupConfig, cache: CacheConfig, key_name: str | None = None
                ) -> Sharing:
    """``key_name``: the caller's gateway key, when keys are configured."""
    if call.method != "POST" or call.payload is None:
        return ALONE
    deterministic = is_deterministic(call.endpoint, call.payload)
    may_dedup = dedup.mode == "all" or (dedup.mode == "deterministic" and deterministic)
    may_dedup = may_dedup and client_headers.get(DEDUP_OPT, "").lower() != "off"
    cache_read, cache_write = _cache_rules(client_headers, cache, deterministic)
    if not (may_dedup or cache_read or cache_write):
        return ALONE
    forwardable = may_dedup and PEER not in client_headers
    control: tuple[tuple[str, str], ...] = ()
    if forwardable:
        control = tuple((name, client_headers[name]) for name in CONTROL_HEADERS
                        if name in client_headers)
        control += ((PEER_KEY, key_name),) if key_name is not None else ()
    key = _key(call, provider, client_headers, key_name)
    return Sharing(key, may_dedup, cache_read, cache_write, forwardable, control)


def is_deterministic(endpoint: str, payload: dict[str, Any]) -> bool:
    if endpoint == "embeddings":
        return True
    return payload.get("temperature") == 0 or payload.get("seed") is not None


def _cache_rules(headers: CIMultiDictProxy[str], cache: CacheConfig, deterministic: bool
                 ) -> tuple[bool, bool]:
    opt = headers.get(CACHE_OPT, "").lower()
    if not cache.enabled or opt == "off" or not (deterministic or opt == "on"):
        return False, False
    directives = {d.strip().lower() for d in headers.get("Cache-Control", "").split(",")}
    if "no-store" in directives:
        return False, False
    return "no-cache" not in directives, True


def _key(call: Call, provider: str, headers: CIMultiDictProxy[str], key_name: str | None
         ) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    # Accept-Encoding changes the answer's bytes (a gzip body must never reach a client
    # that did not ask for one): it is part of what is shared.
    for part in (caller_identity(headers, key_name), headers.get("Accept-Encoding", ""), provider,
                 call.method, call.endpoint, call.query):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(orjson.dumps(call.payload, option=orjson.OPT_SORT_KEYS))
    return digest.digest()


def caller_identity(headers: CIMultiDictProxy[str], key_name: str | None = None) -> str:
    """Who is asking: its gateway key's name when keys are configured (a request a peer
    forwarded has no ``Authorization`` left, but its key's name, so both workers compute
    the same identity), else the credentials drop-in mode forwards; and the OpenAI
    organization and project it bills to. Hashed where used, never stored."""
    # A NUL never occurs in a header value: a key name cannot pass for an Authorization.
    who = f"\0key\0{key_name}" if key_name is not None else headers.get(AUTHORIZATION, "")
    return "\n".join([who, *(headers.get(name, "") for name in _BILLING_HEADERS)])
