"""Typed keys for what a worker's app holds (aiohttp ``AppKey``/``RequestKey``).

Kept apart from ``app.py`` so handlers and middlewares can name them without importing
the module that wires them together. A side package's keys live beside their types
(``observe/observers.py``'s ``OBSERVERS``, ``observe/metrics.py``'s ``METRICS``,
``core.py``'s ``CORE``), so that this module imports nothing above the request's path.
"""

from __future__ import annotations

from aiohttp import web

from proxy.config.keys import GatewayKey
from proxy.config.worker import WorkerSpec
from proxy.gateway import Live
from proxy.record import Record
from proxy.upstream.client import UpstreamClient

# The config in force and what is built from it (``gateway.py``); SIGHUP replaces it.
LIVE = web.AppKey("live", Live)
WORKER = web.AppKey("worker", WorkerSpec)  # which worker this process is; its peers
CLIENT = web.AppKey("upstream_client", UpstreamClient)  # bench/floor_proxy.py's app

REQUEST_ID = web.RequestKey("request_id", str)
RECORD = web.RequestKey("record", Record)  # what the request did (``record.py``)
GATEWAY_KEY = web.RequestKey("gateway_key", GatewayKey)  # set when keys are configured
# Forwarded by a peer worker that proved it (sharing/peers.py): authenticated and admitted there.
FROM_PEER = web.RequestKey("from_peer", bool)
