"""Cross-worker deduplication: identical requests meet in the worker that owns their key.

With ``--workers N`` the kernel (SO_REUSEPORT) or nginx (``least_conn``) spreads
connections over workers, so two identical requests usually land in different worker
processes, each with its own in-flight map. A request that may be deduplicated is
therefore forwarded, over the owner's unix socket, to the worker its key hashes to
(``key mod N``); the owner deduplicates and caches it like any local request. The cost
is one loopback hop, only for shareable requests and only in multi-worker mode; the
upstream sees one call instead of N.

The forwarded request carries ``X-Gateway-Peer: <proof>`` (an HMAC with the secret the
supervisor gave its workers, ``WorkerSpec.peer_proof``) and, when gateway keys are
configured, ``X-Gateway-Peer-Key: <key name>``: the client's ``Authorization`` is not
forwarded (it is never sent upstream), so the owner takes the caller's key from these,
checks that key's models, and does not count the request against its rate limits a
second time (this worker admitted it and settles its usage from the answer). A worker
never forwards a request that has ``X-Gateway-Peer`` (no loops), and neither header goes
upstream. A client that sends them without a valid proof gains nothing: it is
authenticated as any client, and only opts itself out of cross-worker sharing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import aiohttp
from yarl import URL

from proxy.answers import Answer, from_response
from proxy.call import Call
from proxy.config.worker import WorkerSpec
from proxy.errors import UpstreamUnreachable
from proxy.headers import PEER, PEER_KEY
from proxy.upstream.client import UPSTREAM_EXCEPTIONS


class Peers:
    """The hop to the owner has no read deadline of its own: the owner runs the upstream
    call under the provider's deadlines (with retries, longer than any one of them) and
    always answers, with a 504 or an SSE error event at worst. A shorter bound here
    would cut requests the owner is still rightly waiting on."""

    def __init__(self, worker: WorkerSpec):
        self.worker = worker
        self._sessions: dict[int, aiohttp.ClientSession] = {}
        self.forwarded = 0

    def __repr__(self) -> str:
        return (f"<Peers worker={self.worker.index}/{self.worker.count} "
                f"forwarded={self.forwarded}>")

    def owner(self, key: bytes) -> int | None:
        """The peer to forward to, or ``None`` when this worker answers itself."""
        if self.worker.count < 2 or self.worker.socket_dir is None:
            return None
        owner = int.from_bytes(key[:8], "big") % self.worker.count
        return None if owner == self.worker.index else owner

    @asynccontextmanager
    async def answer(self, call: Call, owner: int, control: Iterable[tuple[str, str]] = ()
                     ) -> AsyncIterator[Answer]:
        """The owner worker's answer to ``call``, relayed as it arrives. ``control``: the
        client's sharing headers (``X-Gateway-Cache``...), which ``call.headers`` lacks
        because they never go upstream, so that the owner decides as this worker would,
        and the caller's gateway key name (``PEER_KEY``), which the proof vouches for."""
        session = self._session(owner)
        headers = call.headers.copy()
        headers.extend(control)
        headers[PEER] = self.worker.peer_proof(call.request_id, headers.get(PEER_KEY, ""))
        url = URL(f"http://worker-{owner}/v1/{call.endpoint}"
                  + (f"?{call.query}" if call.query else ""), encoded=True)
        name = f"worker-{owner}"
        self.forwarded += 1
        try:
            response = await session.request(call.method, url, headers=headers,
                                             data=call.body, allow_redirects=False)
        except UPSTREAM_EXCEPTIONS as exc:
            raise UpstreamUnreachable(
                f"worker {owner} of this gateway did not answer") from exc
        try:
            yield await from_response(response, call.request_id, name)
        finally:
            response.close()

    def _session(self, owner: int) -> aiohttp.ClientSession:
        session = self._sessions.get(owner)
        if session is None:
            connector = aiohttp.UnixConnector(path=str(self.worker.socket_path(owner)))
            session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None))
            self._sessions[owner] = session
        return session

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()

