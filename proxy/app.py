"""Wiring: one function builds a worker's app from a frozen config.

Everything stateful is created here once (``gateway.py`` builds what a config decides,
and rebuilds it on SIGHUP) and stored under a typed key (``state.py``); the upstream
sessions are opened and everything is closed in ``cleanup_ctx``, inside the worker's
event loop. The middleware list and the route table below are the only places their
order is set; ``core.py`` serves them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from proxy import handlers
from proxy.config.loader import Config
from proxy.config.worker import WorkerSpec
from proxy.core import CORE, Core, RouteSpec
from proxy.gateway import Live, Shared
from proxy.middlewares import auth_middleware, error_middleware
from proxy.observe import usage_api
from proxy.observe.access_log import AccessLog
from proxy.observe.accounting import USAGE, Accounting, usage_lifecycle
from proxy.observe.metrics import METRICS, Metrics
from proxy.observe.observers import OBSERVERS, Observers
from proxy.observe.status import HISTORY, History
from proxy.observe.usage import read_deferred
from proxy.sharing.dedup import InflightRequests
from proxy.sharing.peers import Peers
from proxy.state import LIVE, WORKER
from proxy.stores.backends import rate_limiter, redis_link, response_cache
from proxy.stores.redis_link import RedisLink
from proxy.tasks import BackgroundTasks
from proxy.upstream.client import UpstreamClient

log = logging.getLogger("proxy.app")

# Inside core.Core's own first step (request id, clock and record, so a 401 has them).
MIDDLEWARES = (
    error_middleware,  # outermost: every failure below leaves OpenAI-shaped
    auth_middleware,
)
# Exact paths first, then the prefixes in this order (core.py): /v1/models/<id>, then
# every other /v1/ path, sent upstream. GET routes take HEAD too.
ROUTES = (
    RouteSpec("/healthz", handlers.healthz),
    RouteSpec("/health", handlers.health),
    RouteSpec("/metrics", handlers.metrics),
    RouteSpec("/ui", handlers.status_page),
    RouteSpec("/ui/stats", handlers.status_stats),
    RouteSpec("/v1/models", handlers.list_models),
    RouteSpec("/v1/usage", usage_api.usage),
    RouteSpec("/v1/usage", handlers.gateway_only, methods=None),  # never sent upstream
    RouteSpec("/v1/models/", handlers.get_model, prefix=True, param="model"),
    RouteSpec("/v1/", handlers.proxy_handler, methods=None, prefix=True, label=None),
)


def build_app(config: Config, worker: WorkerSpec | None = None) -> web.Application:
    """``worker`` says which of the ``proxy serve --workers N`` processes this is (default:
    the only one); it is stored under ``WORKER`` so handlers can name it and reach peers."""
    app = web.Application(client_max_size=config.server.max_body_bytes)
    worker = worker or WorkerSpec.of(config)
    app[WORKER] = worker
    app[HISTORY] = History()  # the status page's recent samples (observe/status.py)
    redis = redis_link(config)  # None unless a backend uses Redis
    accounting = app[USAGE] = Accounting(config.usage, redis)
    if redis is not None:
        app.on_cleanup.append(lambda _: redis.close())  # after _lifecycle's own cleanup
    live = app[LIVE] = Live(_shared(config, worker, redis), config)
    metrics = app[METRICS] = Metrics(live, worker.metrics_dir)
    live.reload_hooks.append(metrics.reloaded)
    accounting.model_label = lambda model: metrics.labels.of(model, None)[0]
    # What is told of the requests once they have ended (observe/observers.py), in this order:
    # each reads what the ones before it fill.
    observers = app[OBSERVERS] = Observers([read_deferred, metrics.observe,
                                            accounting.observe, AccessLog()])
    # First of the cleanups (cleanup_ctx's teardown, which closes Redis, is on the same
    # list): the last records reach the usage totals before their final flush.
    app.on_cleanup.insert(0, observers.cleanup)
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(usage_lifecycle)  # its final flush runs before _lifecycle's end
    app[CORE] = Core(app, ROUTES, MIDDLEWARES, metrics, observers)
    return app


def _shared(config: Config, worker: WorkerSpec, redis: RedisLink | None) -> Shared:
    return Shared(
        client=UpstreamClient(config), tasks=BackgroundTasks(),
        inflight=InflightRequests(config.dedup.max_buffer_bytes),
        cache=response_cache(config, redis), peers=Peers(worker),
        rate_limiter=rate_limiter(config, redis))


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Open the upstream pools and start discovery in the background, so the first
    request rarely waits for it; at shutdown, stop background work, then the pools."""
    live = app[LIVE]
    shared = live.shared
    await shared.client.start()
    config = live.gateway.config
    for provider in config.providers:
        if provider.api_key_missing:
            log.warning("provider '%s': environment variable %s is not set", provider.name,
                        provider.api_key_env)
    if live.gateway.keyring.open:
        log.warning("no gateway keys configured (auth.keys): anyone who can reach this "
                    "gateway may use it")
    live.gateway.catalog.refresh_soon()
    shared.tasks.spawn(app[METRICS].flush_forever(), name="metrics-flush")
    yield
    await shared.tasks.close()
    await shared.peers.close()
    await shared.client.close()
