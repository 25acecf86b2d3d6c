"""Which worker a process is and where its peers listen: the part of a worker's
configuration the supervisor decides (``server/supervisor.py``), not the file."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config.loader import Config


@dataclass(frozen=True)
class WorkerSpec:
    """Which worker this process is, and where its peers listen.

    Built once per worker process and stored under ``state.WORKER``. ``socket_dir`` is
    ``None`` when workers listen on TCP only (then there are no peer sockets).
    ``peer_secret`` is empty outside a supervised worker: then no request is a peer's.
    ``metrics_dir`` is the supervisor's directory for every worker's metrics files
    (``observe/metrics_state.py``), ``None`` for a single process (metrics in memory).
    """

    index: int = 0
    count: int = 1
    socket_dir: Path | None = None
    peer_secret: bytes = field(default=b"", repr=False, compare=False)
    metrics_dir: Path | None = None

    @classmethod
    def of(cls, config: Config, index: int = 0, count: int = 1,
           peer_secret: bytes = b"", metrics_dir: Path | None = None) -> WorkerSpec:
        """The spec for worker ``index`` of ``count`` with ``config``'s socket directory."""
        socket_dir = config.server.socket_dir
        return cls(index=index, count=count, peer_secret=peer_secret,
                   socket_dir=Path(socket_dir) if socket_dir is not None else None,
                   metrics_dir=metrics_dir)

    def peer_proof(self, request_id: str, key_name: str) -> str:
        """What a forwarded request carries in ``X-Gateway-Peer``: bound to its request
        id and to the gateway key name it claims, so that a proof seen once vouches for
        nothing else."""
        message = f"{request_id}\n{key_name}".encode("utf-8", "replace")
        return hmac.new(self.peer_secret, message, "sha256").hexdigest()

    def is_peer(self, proof: str, request_id: str, key_name: str) -> bool:
        """Whether ``proof`` shows the request was forwarded by a worker of this gateway."""
        if not self.peer_secret or not proof:
            return False
        expected = self.peer_proof(request_id, key_name).encode()
        return hmac.compare_digest(proof.encode("utf-8", "replace"), expected)

    def socket_path(self, i: int) -> Path:
        """Where worker ``i`` listens (the same rule in every worker and in nginx.conf)."""
        if self.socket_dir is None:
            raise ValueError("no socket_dir configured: workers listen on TCP only")
        return self.socket_dir / f"worker-{i}.sock"

    @property
    def peers(self) -> tuple[Path, ...]:
        """Every worker's socket, this one's included, in index order (empty on TCP)."""
        if self.socket_dir is None:
            return ()
        return tuple(self.socket_path(i) for i in range(self.count))
