"""``GET /v1/usage``: the usage totals (``observe/accounting.py``), per gateway key and model.

Who sees what: with gateway keys, a key sees its own rows and an admin key
(``auth.keys[].admin``) every key's; without keys, everything (the gateway is open).

Where the totals come from: with ``usage.backend: redis``, Redis (every worker and host
using it, as flushed: at most ``flush_interval`` seconds behind; this worker flushes
first). Otherwise each worker holds its own, so the worker answering asks the others
over their unix sockets (``server.socket_dir``), proving itself with the peer HMAC as a
forwarded request does (``sharing/peers.py``), and sums. ``complete`` says whether every worker
answered: without ``socket_dir`` the workers cannot reach each other.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.config.keys import GatewayKey
from proxy.config.worker import WorkerSpec
from proxy.errors import UsageUnavailable
from proxy.headers import PEER, PEER_KEY, REQUEST_ID
from proxy.observe.accounting import FIELDS, USAGE, Rows, add_rows, as_data
from proxy.observe.observers import OBSERVERS
from proxy.state import FROM_PEER, GATEWAY_KEY, WORKER
from proxy.state import REQUEST_ID as REQUEST_ID_KEY

PEER_TIMEOUT = 5.0  # seconds a worker may take to give its totals


async def usage(request: web.Request) -> web.Response:
    request.app[OBSERVERS].flush()  # this worker's totals, exact (observers.py)
    accounting = request.app[USAGE]
    key = request.get(GATEWAY_KEY)
    visible = None if key is None or key.admin else key.name
    worker = request.app[WORKER]
    body: dict[str, Any] = {"object": "usage"}
    if accounting.store is not None:
        await accounting.store.flush()
        read = await accounting.store.read()
        if read is None:
            raise UsageUnavailable()
        since, rows = read
        body.update(backend="redis", since=int(since), complete=True)
    elif request.get(FROM_PEER, False):  # a peer asks for this worker's own totals
        since, rows = accounting.started, accounting.rows
        body.update(backend="memory", since=int(since), workers=1)
    else:
        since, rows, answered = await _all_workers(request, worker, key, accounting.rows,
                                                   accounting.started)
        body.update(backend="memory", since=int(since), workers=answered,
                    complete=answered == worker.count)
    body["data"] = [row for row in as_data(rows) if visible is None or row["key"] == visible]
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _all_workers(request: web.Request, worker: WorkerSpec, key: GatewayKey | None,
                       own: Rows, started: float) -> tuple[float, Rows, int]:
    """This worker's rows plus every peer's that answers; the earliest start."""
    rows: Rows = {}
    add_rows(rows, ((k, list(v)) for k, v in own.items()))
    if worker.count < 2 or worker.socket_dir is None:
        return started, rows, 1
    request_id = request[REQUEST_ID_KEY]
    name = key.name if key is not None else ""
    answers = await asyncio.gather(*(_peer_totals(worker, i, request_id, name)
                                     for i in range(worker.count) if i != worker.index))
    answered = 1
    for answer in answers:
        if answer is None:
            continue
        answered += 1
        started = min(started, float(answer.get("since", started)))
        add_rows(rows, (((r["key"], r["model"]), [int(r[f]) for f in FIELDS])
                        for r in answer.get("data", ())))
    return started, rows, answered


async def _peer_totals(worker: WorkerSpec, index: int, request_id: str, key_name: str
                       ) -> dict[str, Any] | None:
    """Worker ``index``'s own totals, as the caller's key may see them; None if it does
    not answer (restarting, say)."""
    headers = {REQUEST_ID: request_id, PEER: worker.peer_proof(request_id, key_name)}
    if key_name:
        headers[PEER_KEY] = key_name
    connector = aiohttp.UnixConnector(path=str(worker.socket_path(index)))
    timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT)
    try:
        async with (aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                    session.get(f"http://worker-{index}/v1/usage", headers=headers) as r):
            if r.status != 200:
                return None
            answer = orjson.loads(await r.read())
    except (aiohttp.ClientError, OSError, TimeoutError, orjson.JSONDecodeError):
        return None
    return answer if isinstance(answer, dict) else None
