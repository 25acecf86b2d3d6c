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
from proxy.config import Config
from proxy.discovery import ModelCatalog
from proxy.middlewares import error_middleware, request_id_middleware, set_request_id_header
from proxy.providers import build_provider
from proxy.routing import ModelRouter
from proxy.state import CATALOG, CLIENT, CONFIG, ROUTER, TASKS
from proxy.tasks import BackgroundTasks
from proxy.upstream import UpstreamClient

log = logging.getLogger("proxy.app")

MIDDLEWARES = (
    error_middleware,  # outermost: every failure below leaves OpenAI-shaped
    request_id_middleware,
)


def build_app(config: Config) -> web.Application:
    app = web.Application(middlewares=MIDDLEWARES,
                          client_max_size=config.server.max_body_bytes)
    tasks = BackgroundTasks()
    client = UpstreamClient(config)
    providers = [build_provider(p) for p in config.providers]
    catalog = ModelCatalog(providers, client, tasks, ttl=config.models_cache_ttl,
                           timeout=config.timeouts.discovery,
                           retry_failed_after=config.health_cache_ttl)
    app[CONFIG] = config
    app[TASKS] = tasks
    app[CLIENT] = client
    app[CATALOG] = catalog
    app[ROUTER] = ModelRouter(providers, config.aliases, catalog)
    app.cleanup_ctx.append(_lifecycle)
    app.on_response_prepare.append(set_request_id_header)
    _add_routes(app.router)
    return app


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
    app[CATALOG].refresh_soon()
    yield
    await app[TASKS].close()
    await app[CLIENT].close()
