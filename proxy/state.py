"""Typed keys for what a worker's app holds (aiohttp ``AppKey``/``RequestKey``).

Kept apart from ``app.py`` so handlers and middlewares can name them without importing
the module that wires them together.
"""

from __future__ import annotations

from aiohttp import web

from proxy.dispatch import Timing
from proxy.gateway import Live
from proxy.keys import GatewayKey
from proxy.ratelimit import Admission
from proxy.upstream import UpstreamClient
from proxy.workers import WorkerSpec

# The config in force and what is built from it (``gateway.py``); SIGHUP replaces it.
LIVE = web.AppKey("live", Live)
WORKER = web.AppKey("worker", WorkerSpec)  # which worker this process is; its peers
CLIENT = web.AppKey("upstream_client", UpstreamClient)  # bench/floor_proxy.py's app

REQUEST_ID = web.RequestKey("request_id", str)
TIMING = web.RequestKey("timing", Timing)
GATEWAY_KEY = web.RequestKey("gateway_key", GatewayKey)  # set when keys are configured
ADMISSION = web.RequestKey("admission", Admission)  # a rate-limited key's request
# Forwarded by a peer worker that proved it (peers.py): authenticated and admitted there.
FROM_PEER = web.RequestKey("from_peer", bool)
