"""Wiring: one function builds a worker's app from a frozen config.

Everything stateful is created here once and stored under a typed key (``state.py``);
the upstream sessions are opened and everything is closed in ``cleanup_ctx``, inside the
worker's event loop. The middleware list below is the only place their order is set.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from proxy import handlers
from proxy.auth import KeyRing
from proxy.backends import rate_limiter, redis_link, response_cache
from proxy.breaker import CircuitBreaker
from proxy.cache import AnswerCache
from proxy.config import Config
from proxy.dedup import InflightRequests
from proxy.discovery import ModelCatalog
from proxy.dispatch import Dispatcher
from proxy.limits import AdaptiveLimiter, LimitSettings
from proxy.middlewares import (
    auth_middleware,
    context_middleware,
    error_middleware,
    stamp_response,
)
from proxy.peers import Peers
from proxy.providers import Provider, build_provider
from proxy.retry import RetryPolicy
from proxy.routing import ModelRouter
from proxy.state import (
    CATALOG,
    CLIENT,
    CONFIG,
    DISPATCHER,
    KEYRING,
    RATE_LIMITER,
    ROUTER,
    TASKS,
    WORKER,
)
from proxy.tasks import BackgroundTasks
from proxy.upstream import UpstreamClient
from proxy.workers import WorkerSpec

log = logging.getLogger("proxy.app")

MIDDLEWARES = (
    error_middleware,  # outermost: every failure below leaves OpenAI-shaped
    context_middleware,  # request id and overhead clock, so a 401 has them too
    auth_middleware,
)


def build_app(config: Config, worker: WorkerSpec | None = None) -> web.Application:
    """``worker`` says which of the ``proxy serve --workers N`` processes this is (default:
    the only one); it is stored under ``WORKER`` so handlers can name it and reach peers."""
    app = web.Application(middlewares=MIDDLEWARES,
                          client_max_size=config.server.max_body_bytes)
    tasks = BackgroundTasks()
    client = UpstreamClient(config)
    providers = [build_provider(p) for p in config.providers]
    catalog = ModelCatalog(providers, client, tasks, ttl=config.models_cache_ttl,
                           timeout=config.timeouts.discovery,
                           retry_failed_after=config.health_cache_ttl)
    app[CONFIG] = config
    app[KEYRING] = KeyRing(config.auth.keys)
    redis = redis_link(config)  # None unless a backend uses Redis
    if redis is not None:
        app.on_cleanup.append(lambda _: redis.close())  # after _lifecycle's own cleanup
    app[RATE_LIMITER] = rate_limiter(config, redis)
    worker = worker or WorkerSpec.of(config)
    app[WORKER] = worker
    app[TASKS] = tasks
    app[CLIENT] = client
    app[CATALOG] = catalog
    app[ROUTER] = ModelRouter(providers, config.aliases, catalog)
    app[DISPATCHER] = _dispatcher(config, client, tasks, worker, providers,
                                  response_cache(config, redis))
    app.cleanup_ctx.append(_lifecycle)
    app.on_response_prepare.append(stamp_response)
    _add_routes(app.router)
    return app


def _dispatcher(config: Config, client: UpstreamClient, tasks: BackgroundTasks,
                worker: WorkerSpec, providers: list[Provider], cache: AnswerCache
                ) -> Dispatcher:
    limits = config.limits
    settings = LimitSettings(
        initial=limits.initial, min=limits.min, max=limits.max, queue_size=limits.queue_size,
        queue_timeout=limits.queue_timeout, tolerance=limits.tolerance, slack=limits.slack,
        backoff=limits.backoff)
    limiters = {p.name: AdaptiveLimiter(
        p.name, settings, on_limit_change=client.limit_follower(p.base_url, p.tls, p.name))
        for p in providers}
    return Dispatcher(
        client, tasks, InflightRequests(config.dedup.max_buffer_bytes), cache, limiters,
        config.dedup.max_buffer_bytes, Peers(worker, config.timeouts.read),
        {p.name: RetryPolicy(config.retries) for p in providers},
        {p.name: CircuitBreaker(p.name, config.breaker) for p in providers})


def _add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/healthz", handlers.healthz)
    router.add_get("/health", handlers.health)
    router.add_get("/v1/models", handlers.list_models)
    router.add_get("/v1/models/{model:.+}", handlers.get_model)
    router.add_route("*", "/v1/{tail:.+}", handlers.proxy_handler)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Open the upstream pools and start discovery in the background, so the first
    request rarely waits for it; at shutdown, stop background work, then the pools."""
    await app[CLIENT].start()
    for provider in app[CONFIG].providers:
        if provider.api_key_missing:
            log.warning("provider '%s': environment variable %s is not set", provider.name,
                        provider.api_key_env)
    if app[KEYRING].open:
        log.warning("no gateway keys configured (auth.keys): anyone who can reach this "
                    "gateway may use it")
    app[CATALOG].refresh_soon()
    yield
    await app[TASKS].close()
    await app[DISPATCHER].peers.close()
    await app[CLIENT].close()
