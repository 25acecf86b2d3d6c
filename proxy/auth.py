"""Who is calling: the gateway key a request presents (issue #4).

Runs as ``auth_middleware`` (``middlewares.py``), before any routing or upstream work.
With no keys configured the gateway is open and says so once at start-up. The presented
secret is hashed and looked up by its sha256: nothing compares the secret itself, so its
bytes leak nothing through timing, and the final comparison of the hashes is
``hmac.compare_digest``. The key never goes upstream (``handlers.read_call`` drops the
client's ``Authorization`` once it was a gateway key).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from proxy.config.keys import GatewayKey, hash_secret
from proxy.errors import AdminKeyRequired, Unauthorized

# Liveness and health carry no secrets and must answer load balancers without a key.
# The status page holds no figures: a browser cannot send a bearer key when it opens a
# page, so the page loads and its script fetches /ui/stats with the admin key typed in.
OPEN_PATHS = frozenset({"/healthz", "/health", "/ui"})


class KeyRing:
    def __init__(self, keys: Iterable[GatewayKey]):
        self._by_hash = {key.sha256: key for key in keys}

    def __repr__(self) -> str:
        return f"<KeyRing keys={len(self._by_hash)}>"

    @property
    def open(self) -> bool:
        return not self._by_hash

    def named(self, name: str) -> GatewayKey:
        """The key called ``name``, for a request a peer worker authenticated already
        (``sharing/peers.py``); ``Unauthorized`` if a reload removed it meanwhile."""
        key = next((k for k in self._by_hash.values() if k.name == name), None)
        if key is None:
            raise Unauthorized("The gateway key is not valid.")
        return key

    def authenticate(self, authorization: str | None) -> GatewayKey:
        """The key behind an ``Authorization: Bearer <secret>`` header, or ``Unauthorized``."""
        scheme, _, secret = (authorization or "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise Unauthorized("This gateway needs a key: send 'Authorization: Bearer <key>'.")
        digest = hash_secret(secret)
        key = self._by_hash.get(digest)
        if key is None or not hmac.compare_digest(key.sha256, digest):
            raise Unauthorized("The gateway key is not valid.")
        return key


def require_admin(key: GatewayKey | None, keyring: KeyRing) -> None:
    """The operator's pages: open when the gateway has no keys (as everything is), else
    only to an admin key (``AdminKeyRequired``: 403). ``key`` is the one the auth
    middleware found."""
    if keyring.open:
        return
    if key is None or not key.admin:
        raise AdminKeyRequired()
