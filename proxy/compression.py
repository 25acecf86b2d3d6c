"""gzip for large answers the upstream sent uncompressed (issue 10: Ollama, vLLM, the
models listing, embeddings), as the ``compression:`` section (``config/compression.py``)
sets it up.

An answer is compressed when all of these hold, checked cheapest first so that the
usual small chat answer costs one length comparison and nothing else:

* it is larger than ``min_bytes`` (1 KiB): below that gzip's 18-byte frame and the CPU
  buy nothing;
* it is a non-stream answer, not an event stream, not an error (``streaming.py``: an
  SSE event must reach the client at once, and zlib would hold it back; error bodies are
  small and are sent as the provider wrote them);
* the upstream did not encode it already (any ``Content-Encoding``, even ``identity``:
  its bytes pass through as they came), its ``Content-Type`` is text-like (JSON, text,
  XML: not ``audio/mpeg`` from ``/v1/audio/speech``) and ``Cache-Control`` has no
  ``no-transform`` (RFC 9111 section 5.2.2.6 forbids an intermediary to change the coding);
* the client accepts gzip (``Accept-Encoding``, RFC 9110 section 12.5.3: ``gzip`` or
  ``x-gzip``, else ``*``, with a weight above 0).

Every answer that passes the first three, compressed or not, carries
``Vary: Accept-Encoding`` so a shared cache in front keeps the two forms apart.

Level 1 is the default: on a 16 x 1536 embeddings answer (509 KiB of floats) it takes
4.9 ms for 47 % of the size where level 6 takes 30 ms for 44 %; a 300-model listing
shrinks to 4-6 % at any level (bench/RESULTS.md, "Response compression").
"""

from __future__ import annotations

from aiohttp.compression_utils import ZLibCompressor
from multidict import CIMultiDict, istr

from proxy.config.compression import CompressionConfig

ACCEPT_ENCODING = istr("Accept-Encoding")
CONTENT_ENCODING = istr("Content-Encoding")
VARY = istr("Vary")
# zlib releases the GIL: a body larger than this is compressed in the loop's default
# executor, so that the loop is never blocked for more than ~2.5 ms at level 1 (aiohttp
# offloads above 1 MiB, ~10 ms on the same machine).
OFFLOAD_BYTES = 256 * 1024
_TEXT_LIKE = ("json", "text/", "xml", "javascript")


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` value admits gzip: named with q > 0, or not named
    and ``*`` with q > 0. A weight that does not parse counts as 0: identity is always
    safe."""
    if not accept_encoding:
        return False
    value = accept_encoding.lower()
    if "gzip" not in value and "*" not in value:
        return False
    star = False
    for item in value.split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip()
        if coding in ("gzip", "x-gzip"):
            return _weight(params) > 0
        if coding == "*":
            star = _weight(params) > 0
    return star


def _weight(params: str) -> float:
    for param in params.split(";"):
        name, _, number = param.partition("=")
        if name.strip() == "q":
            try:
                weight = float(number.strip())
            except ValueError:
                return 0.0
            return weight if 0 <= weight <= 1 else 0.0
    return 1.0


def compressible(headers: CIMultiDict[str]) -> bool:
    """Whether the answer with these headers may be gzip'ed by the gateway at all
    (its size aside): not encoded yet, text-like, no ``no-transform``."""
    if CONTENT_ENCODING in headers:
        return False
    content_type = headers.get("Content-Type", "").lower()
    if not any(kind in content_type for kind in _TEXT_LIKE):
        return False
    return "no-transform" not in headers.get("Cache-Control", "").lower()


def vary_on_accept_encoding(headers: CIMultiDict[str]) -> None:
    """Add ``Vary: Accept-Encoding`` beside any ``Vary`` the upstream sent, unless it
    already covers it (names it, or ``*``)."""
    for value in headers.getall(VARY, ()):
        if "accept-encoding" in value.lower() or value.strip() == "*":
            return
    headers.add(VARY, "Accept-Encoding")


def gzip_for(config: CompressionConfig, accept_encoding: str | None,
             headers: CIMultiDict[str]) -> ZLibCompressor | None:
    """A gzip compressor for this answer, with its headers set (``Content-Encoding``,
    no ``Content-Length``: the caller frames the new body), or ``None`` to send it as
    it is. For answers already known to be larger than ``config.min_bytes``. Either way
    a compressible answer varies with ``Accept-Encoding``, and says so."""
    if not config.enabled or not compressible(headers):
        return None
    vary_on_accept_encoding(headers)
    if not accepts_gzip(accept_encoding):
        return None
    headers[CONTENT_ENCODING] = "gzip"
    headers.popall("Content-Length", None)
    return ZLibCompressor(encoding="gzip", level=config.level,
                          max_sync_chunk_size=OFFLOAD_BYTES)


async def gzip_whole(compressor: ZLibCompressor, body: bytes) -> bytes:
    """``body`` as one gzip member (offloaded to a thread when large)."""
    return await compressor.compress(body) + compressor.flush()


async def maybe_gzip(config: CompressionConfig, accept_encoding: str | None,
                     headers: CIMultiDict[str], body: bytes) -> bytes:
    """``body`` as it goes to the client: gzip'ed when this answer and this client allow
    it (``headers`` updated), else unchanged."""
    if len(body) <= config.min_bytes:
        return body
    compressor = gzip_for(config, accept_encoding, headers)
    return body if compressor is None else await gzip_whole(compressor, body)
