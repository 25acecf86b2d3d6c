"""Which headers cross the gateway, in each direction.

Everything end-to-end passes through unchanged, as nginx would forward it (custom
``X-*``, ``Retry-After``, ``x-ratelimit-*``, ``openai-*``). Hop-by-hop headers, those
named in RFC 9110 section 7.6.1 plus every header the ``Connection`` header lists, are
dropped in both directions: they describe one connection, not the message.
"""

from __future__ import annotations

import functools

from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.errors import UnsupportedContentEncoding

HOP_BY_HOP = frozenset(
    istr(name)
    for name in (
        "Connection", "Keep-Alive", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
        "Proxy-Authorization", "Proxy-Authenticate", "Proxy-Connection",
    )
)
_HOP_BY_HOP_LOWER = frozenset(name.lower() for name in HOP_BY_HOP)

# Set by the gateway itself for the hop it owns: the upstream connection or the client's.
_RESPONSE_OWNED = frozenset(istr(n) for n in ("Date", "Server"))

REQUEST_ID = istr("X-Request-ID")
# A request forwarded by another worker (sharing/peers.py): the proof that it is one, and the
# name of the caller's gateway key, which the forwarded request no longer carries.
PEER = istr("X-Gateway-Peer")
PEER_KEY = istr("X-Gateway-Peer-Key")
# The client's sharing instructions (sharing/policy.py): for the gateway, never the provider.
DEDUP_OPT = istr("X-Gateway-Dedup")
CACHE_OPT = istr("X-Gateway-Cache")
# Response: the deployment that answered (routing.py, resilience/failover.py).
PROVIDER = istr("X-Gateway-Provider")
_REQUEST_OWNED = frozenset((istr("Host"), istr("Content-Length"), istr("Expect"), PEER,
                            PEER_KEY, DEDUP_OPT, CACHE_OPT))
AUTHORIZATION = istr("Authorization")
CONTENT_ENCODING = istr("Content-Encoding")
# The request content codings aiohttp's parser decodes before the handler reads the body
# (one coding, case-insensitive; br and zstd only with their optional packages installed).
DECODED_CODINGS = ("gzip", "deflate", *(("br",) if HAS_BROTLI else ()),
                   *(("zstd",) if HAS_ZSTD else ()))


def _parse_tokens(connection: str) -> frozenset[str]:
    """Header names listed in ``Connection``: hop-by-hop for this message only."""
    return frozenset(t.strip().lower() for t in connection.split(",") if t.strip())


_CACHED_CONNECTION = 256  # a longer Connection value is parsed, not cached: the cache
# holds 64 values at most, so it never holds more than 16 KiB of what clients sent


@functools.lru_cache(maxsize=64)
def _skipped(owned: frozenset[istr], connection: str = "") -> frozenset[str]:
    """Hop-by-hop, ``owned`` and the ``Connection`` header's tokens, lower-cased; built
    once per (``owned``, ``Connection`` value): the callers pass module constants and
    nearly every message says ``keep-alive``, so the profile's per-request set
    building (issue 11) is a cache hit. Bounded: a client's odd values only evict."""
    return _HOP_BY_HOP_LOWER.union(name.lower() for name in owned).union(
        _parse_tokens(connection))


def end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], owned: frozenset[istr] = frozenset()
) -> CIMultiDict[str]:
    """A copy of ``headers`` without hop-by-hop headers and without ``owned`` ones."""
    values = headers.getall("Connection", ())
    connection = ",".join(values) if values else ""
    skip = (_skipped(owned, connection) if len(connection) <= _CACHED_CONNECTION
            else _skipped(owned) | _parse_tokens(connection))
    # Compared lower-cased: a set of istr matches only the exact case (HTTP/2 clients
    # send every name in lower case). One constructor call over a filtered list:
    # per-header add() calls showed in the profile (issue #3).
    return CIMultiDict([(name, value) for name, value in headers.items()
                        if name.lower() not in skip])


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    *,
    client_ip: str | None,
    scheme: str,
    request_id: str,
) -> CIMultiDict[str]:
    """Client headers as they go upstream, with the forwarding headers set."""
    headers = end_to_end(incoming, _REQUEST_OWNED)
    previous = headers.get("X-Forwarded-For")
    if client_ip:
        headers["X-Forwarded-For"] = f"{previous}, {client_ip}" if previous else client_ip
    headers.setdefault("X-Forwarded-Proto", scheme)
    headers[REQUEST_ID] = request_id
    return headers


def check_content_coding(incoming: CIMultiDictProxy[str]) -> bool:
    """Whether the request's ``Content-Encoding`` must be dropped: aiohttp decoded the body
    (or it is ``identity``), and the decoded bytes must not go upstream under that header
    (issue 9: the upstream failed to decode them, retries followed, the breaker opened).
    Any other coding aiohttp leaves encoded, which the gateway cannot route on: 415."""
    values = incoming.getall(CONTENT_ENCODING, ())
    if not values:
        return False
    coding = ",".join(values).strip().lower()
    if len(values) == 1 and coding.isascii() and coding in (*DECODED_CODINGS, "identity"):
        return True
    raise UnsupportedContentEncoding(", ".join(DECODED_CODINGS))


def client_response_headers(upstream: CIMultiDictProxy[str], request_id: str
                            ) -> CIMultiDict[str]:
    """Upstream answer headers as they go to the client. ``Content-Length`` stays: the
    body bytes are relayed untouched. The upstream's own request id (OpenAI's, say) is
    kept as ``X-Upstream-Request-ID``: the gateway's id is the one the client sent."""
    headers = end_to_end(upstream, _RESPONSE_OWNED)
    upstream_id = headers.popone(REQUEST_ID, None)
    if upstream_id is not None and upstream_id != request_id:
        headers["X-Upstream-Request-ID"] = upstream_id
    return headers
