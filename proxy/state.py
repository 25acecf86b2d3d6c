"""Typed keys for what a worker's app holds (aiohttp ``AppKey``/``RequestKey``).

Kept apart from ``app.py`` so handlers and middlewares can name them without importing
the module that wires them together.
"""

from __future__ import annotations

from aiohttp import web

from proxy.auth import KeyRing
from proxy.config import Config
from proxy.discovery import ModelCatalog
from proxy.dispatch import Dispatcher, Timing
from proxy.keys import GatewayKey
from proxy.ratelimit import Admission, RateLimiter
from proxy.routing import ModelRouter
from proxy.tasks import BackgroundTasks
from proxy.upstream import UpstreamClient
from proxy.workers import WorkerSpec

CONFIG = web.AppKey("config", Config)
TASKS = web.AppKey("tasks", BackgroundTasks)
CLIENT = web.AppKey("upstream_client", UpstreamClient)
CATALOG = web.AppKey("model_catalog", ModelCatalog)
ROUTER = web.AppKey("model_router", ModelRouter)
WORKER = web.AppKey("worker", WorkerSpec)  # which worker this process is; its peers
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
KEYRING = web.AppKey("keyring", KeyRing)
RATE_LIMITER = web.AppKey("rate_limiter", RateLimiter)

REQUEST_ID = web.RequestKey("request_id", str)
TIMING = web.RequestKey("timing", Timing)
GATEWAY_KEY = web.RequestKey("gateway_key", GatewayKey)  # set when keys are configured
ADMISSION = web.RequestKey("admission", Admission)  # a rate-limited key's request
