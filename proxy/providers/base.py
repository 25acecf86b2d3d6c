"""The provider contract: everything that differs between upstream APIs lives behind it.

A provider is called at four points of a request's life, in this order:

1. :meth:`Provider.prepare` turns the client's :class:`Call` into an ``UpstreamRequest``
   (URL, headers with credentials, body). Runs before any upstream I/O.
2. :meth:`Provider.translate_headers` adapts a successful answer's headers.
3. :meth:`Provider.translate_stream` adapts a successful answer's body, chunk by chunk,
   as it arrives. ``openai_compat`` returns the chunks untouched.
4. :meth:`Provider.translate_error` adapts an upstream error answer's (buffered) body.

Plus :meth:`Provider.list_models` for discovery and health. Providers never touch the
client connection, routing or the server: that is what keeps "a new provider = one
module + one registry line" true.
"""

from __future__ import annotations

import functools
import os
import ssl
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from multidict import CIMultiDict
from yarl import URL

from proxy.call import Call
from proxy.config.providers import ProviderConfig
from proxy.errors import UpstreamError
from proxy.headers import AUTHORIZATION
from proxy.upstream.client import UpstreamClient
from proxy.upstream.protocol import UpstreamRequest

_URL_MEMO_SIZE = 256


def tls_context(ca_file: str) -> ssl.SSLContext:
    """One context per CA file and version of it (a replaced file gets a new one)."""
    return _tls_context(ca_file, os.stat(ca_file).st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _tls_context(ca_file: str, version: int) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


class Provider(ABC):
    """One configured upstream. Subclasses set ``type_name`` and implement the hooks."""

    type_name: ClassVar[str]
    # False for a provider whose answers pass through untouched: the relay then reads
    # the upstream body directly, without the translate_* hooks (the hot path).
    translates_body: ClassVar[bool] = True
    # Honours ``stream_options.include_usage`` as OpenAI does: each chunk gains
    # ``"usage":null`` and one last chunk with empty ``choices`` carries the usage.
    honours_stream_usage: ClassVar[bool] = False

    def __init__(self, config: ProviderConfig):
        self.config = config
        self.name = config.name
        # May the gateway ask it for a stream's usage the client did not ask for?
        self.asks_stream_usage = self.honours_stream_usage and config.stream_usage
        self.base_url = URL(config.base_url)
        # Shared: an SSL context is costly, and the upstream pool keys its origins on it,
        # so a reload must find the same one (a new one per reload stranded the old
        # origin's connections and cap).
        self.tls = tls_context(config.ca_file) if config.ca_file else None
        self._urls: dict[tuple[str, str], URL] = {}
        self._own = own_headers(config)
        self.replaced, self.credentials = credential_block(self._own,
                                                           config.forward_client_auth)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} base_url={self.config.base_url!r}>"

    @abstractmethod
    def prepare(self, call: Call) -> UpstreamRequest:
        """Build the upstream request for ``call``; raise a GatewayError to refuse it."""

    def translate_headers(self, call: Call, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        return headers

    def translate_stream(self, call: Call, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return chunks

    def translate_error(self, call: Call, status: int, body: bytes) -> bytes:
        return body

    @abstractmethod
    async def list_models(self, client: UpstreamClient) -> list[str]:
        """The model names this upstream serves, as it names them (no prefix)."""

    async def list_models_as(self, client: UpstreamClient, authorization: str
                             ) -> list[dict[str, Any]]:
        """The upstream's own listing entries as the caller holding ``authorization``
        sees them (a provider that takes each caller's key, the ``--upstream`` drop-in).
        Default: :meth:`list_models`'s names, asked without the caller's key."""
        return [{"id": name} for name in await self.list_models(client)]

    def url(self, path: str, query: str = "") -> URL:
        """``base_url`` joined with ``path``, keeping the base's own path prefix. The few
        paths clients use are remembered (building a URL showed in the profile); the
        memo is bounded, so arbitrary paths cannot grow it."""
        key = (path, query)
        url = self._urls.get(key)
        if url is None:
            joined = f"{self.config.base_url}/{path.lstrip('/')}"
            url = URL(f"{joined}?{query}" if query else joined, encoded=True)
            if len(self._urls) < _URL_MEMO_SIZE:
                self._urls[key] = url
        return url

    def upstream_request(self, method: str, url: URL, headers: CIMultiDict[str],
                         body: bytes) -> UpstreamRequest:
        """The request to send: the client's ``headers`` (never changed: a failover leg
        to another provider reads them again) without the names this provider's own
        credentials replace, which follow as its pre-serialised block."""
        return UpstreamRequest(method, url, headers, body, self.tls, self.replaced,
                               self.credentials)

    def control_headers(self) -> CIMultiDict[str]:
        """Headers for discovery and health requests (no client involved)."""
        headers = CIMultiDict({"Accept": "application/json"})
        headers.update(self._own)  # a configured Accept replaces ours
        return headers


def own_headers(config: ProviderConfig) -> CIMultiDict[str]:
    """The provider's own headers: the configured ones and its key, which always wins
    (over a configured Authorization too, whatever its case)."""
    own: CIMultiDict[str] = CIMultiDict(config.headers)
    if config.api_key:
        own[AUTHORIZATION] = f"Bearer {config.api_key}"
    return own


def credential_block(own: CIMultiDict[str], forward_client_auth: bool
                     ) -> tuple[frozenset[str], bytes]:
    """The provider's ``own`` headers as upstream head lines, serialised once (issue
    11's pre-serialised blocks), and the lower-cased names of the client's headers they
    replace or drop: without a key of its own, the client's Authorization is forwarded
    only when ``forward_client_auth`` allows it (the ``--upstream`` drop-in). Values are
    validated single lines (``config/``)."""
    replaced = {name.lower() for name in own}
    if not forward_client_auth:
        replaced.add(AUTHORIZATION.lower())
    block = "".join(f"{name}: {value}\r\n" for name, value in own.items())
    return frozenset(replaced), block.encode()


def models_error(provider: Provider, status: int, body: Any) -> UpstreamError:
    """The discovery error for a non-200 models answer; never echoes credentials."""
    if status in (401, 403):
        return UpstreamError(f"'{provider.name}' rejected the credentials (HTTP {status})",
                             code="upstream_auth_failed")
    return UpstreamError(f"'{provider.name}' answered the models request with HTTP {status}")
