"""Request handlers. ``proxy_handler`` is the data path, and reads top to bottom:
read the call, route the model, let the provider prepare the upstream request, send it,
relay the answer.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.auth import require_admin
from proxy.call import Call
from proxy.compression import ACCEPT_ENCODING, maybe_gzip
from proxy.config.compression import NEVER
from proxy.config.loader import Config
from proxy.discovery import Snapshot
from proxy.errors import (
    BodyTooLarge,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotAllowed,
    ModelNotFound,
)
from proxy.gateway import Gateway
from proxy.headers import (
    AUTHORIZATION,
    CONTENT_ENCODING,
    check_content_coding,
    upstream_request_headers,
)
from proxy.observe import status as stats
from proxy.observe.metrics import METRICS
from proxy.observe.observers import OBSERVERS
from proxy.observe.usage import ask_usage, tap
from proxy.record import Origin, Record, endpoint_label
from proxy.resilience.ratelimit import Admission, RateLimiter, estimate
from proxy.routing import Route
from proxy.sharing.policy import sharing_for
from proxy.state import FROM_PEER, GATEWAY_KEY, LIVE, RECORD, REQUEST_ID, WORKER
from proxy.streaming import send_answer

# Endpoints whose POST body must name a model; other /v1/ paths may omit it.
MODEL_ENDPOINTS = frozenset({"chat/completions", "completions", "embeddings", "responses"})


async def proxy_handler(request: web.Request) -> web.StreamResponse:
    """Every request under ``/v1/`` except the models listing."""
    live = request.app[LIVE]
    gateway = live.gateway  # read once: a reload meanwhile does not change this request's
    config = gateway.config
    record = request[RECORD]
    call = await read_call(request, config)
    _note_call(record, call)
    route = await gateway.router.resolve(call.model)
    record.origin = Origin(route.provider.name, route.upstream_model, attempts=0)
    admission = await admit(request, call, route, live.shared.rate_limiter)
    call.upstream_model = route.upstream_model
    ask_usage(call, route)  # before the sharing key: asked or not, one upstream stream
    sharing = sharing_for(call, route.label, request.headers, config.dedup, config.cache,
                          record.key_name)
    answered = False
    try:
        async with gateway.dispatcher.answer(call, route, sharing, record) as answer:
            answered = True
            if answer.origin is not None:
                record.origin, record.upstream_status = answer.origin, answer.status
            tap(answer, call, record, admission)
            return await send_answer(request, answer, buffered=not call.stream,
                                     record=record, keepalive=config.timeouts.sse_keepalive,
                                     compression=NEVER if record.forwarded
                                     else config.compression)
    except GatewayError:
        # No answer at all: the gateway's own failure costs the key no tokens. Once one
        # began (a deadline cut it, say), the upstream worked: the estimate stands.
        if admission is not None and not answered:
            await admission.settle(0)
        raise


def _note_call(record: Record, call: Call) -> None:
    """What the access log and metrics say of the request, once it is understood (its
    key name was noted where the key was found: ``auth_middleware``)."""
    record.path = endpoint_label(call.endpoint)
    record.model, record.stream = call.model, call.stream
    record.bytes_in = len(call.body)


async def admit(request: web.Request, call: Call, route: Route, limiter: RateLimiter
                ) -> Admission | None:
    """What the caller's gateway key allows: this model (else 403), and this request
    within its rate limits (else 429). The admission's x-ratelimit-* headers go on the
    answer (``Record.stamp``), and its token estimate is corrected from the answer.
    A request a peer worker forwarded was admitted there, which also settles its usage:
    counting it here again would charge the key twice."""
    key = request.get(GATEWAY_KEY)
    if key is None:
        return None
    if call.model is not None and not key.allows(*_model_names(call.model, route)):
        raise ModelNotAllowed(key.name, call.model)
    if request.get(FROM_PEER, False):
        return None
    admission = await limiter.admit(key, estimate(call.payload, call.body))
    if admission is not None:
        request[RECORD].reply_headers = admission.headers
    return admission


async def read_call(request: web.Request, config: Config) -> Call:
    """The client's request, read whole (bounded by ``max_body_bytes``) and understood
    as far as routing needs: the ``model`` and ``stream`` fields, nothing more."""
    limit = config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    decoded = check_content_coding(request.headers)  # a 415 leaves the body unread
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(limit) from None
    except web.RequestPayloadError as exc:  # a body that does not decode (bad gzip, say)
        raise InvalidRequest(f"The request body could not be read ({exc}).",
                             code="invalid_body") from None
    # The path and query go upstream byte for byte as the client sent them, escapes
    # included (``match_info`` and even yarl's raw forms are normalised).
    raw_path, _, query = request.raw_path.partition("?")
    endpoint = raw_path.removeprefix("/v1/")
    needs_model = request.method == "POST" and endpoint in MODEL_ENDPOINTS
    payload = _json_object(body, needs_model or request.content_type == "application/json")
    model = _model(payload, needs_model)
    request_id = request[REQUEST_ID]
    headers = upstream_request_headers(request.headers, client_ip=request.remote,
                                       scheme=request.scheme, request_id=request_id)
    if GATEWAY_KEY in request:
        headers.popall(AUTHORIZATION, None)  # the gateway's key is never sent upstream
    if decoded:  # the decoded bytes go upstream, framed by their own Content-Length
        headers.popall(CONTENT_ENCODING, None)
    return Call(
        method=request.method, endpoint=endpoint, query=query, body=body,
        payload=payload, model=model, stream=bool(payload and payload.get("stream") is True),
        headers=headers, request_id=request_id, caller=_caller(request),
    )


def _caller(request: web.Request) -> str:
    """Who sent the request, for the circuit breaker's distinct callers (issue #9): the
    gateway key's name, else a hash of the client's Authorization, else its address."""
    key = request.get(GATEWAY_KEY)
    if key is not None:
        return f"key:{key.name}"
    authorization = request.headers.get(AUTHORIZATION)
    if authorization:
        digest = hashlib.blake2b(authorization.encode(), digest_size=8).hexdigest()
        return f"auth:{digest}"
    return f"addr:{request.remote}"


def _json_object(body: bytes, must_parse: bool) -> dict[str, Any] | None:
    if not body or not must_parse:
        return None
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}",
                             code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return payload


def _model(payload: dict[str, Any] | None, required: bool) -> str | None:
    model = payload.get("model") if payload else None
    if isinstance(model, str) and model:
        return model
    if required or model is not None:
        raise InvalidRequest("The request must name a 'model' (a non-empty string).",
                             code="missing_model", param="model")
    return None


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``: every provider's models, merged. Providers that failed are
    listed under ``errors`` beside the others' models (SDKs ignore the extra key)."""
    gateway = request.app[LIVE].gateway
    snapshot = await _listing(request, gateway)
    body: dict[str, Any] = {"object": "list", "data": _visible_models(request, gateway, snapshot)}
    failed = [{"provider": s.provider, "message": s.error}
              for s in snapshot.statuses if not s.healthy]
    if failed:
        body["errors"] = failed
    return await large_json_response(request, gateway, body)


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model"]
    gateway = request.app[LIVE].gateway
    snapshot = await _listing(request, gateway)
    for entry in _visible_models(request, gateway, snapshot):
        if entry["id"] == model_id:
            return await large_json_response(request, gateway, entry)
    raise ModelNotFound(model_id)


async def _listing(request: web.Request, gateway: Gateway) -> Snapshot:
    """The catalog; a provider that lists only with each caller's key (the ``--upstream``
    drop-in) is asked with this caller's ``Authorization``. Not with gateway keys: the
    caller's is then the gateway's key, never sent upstream (issue 9)."""
    snapshot = await gateway.catalog.current()
    authorization = request.headers.get(AUTHORIZATION)
    if (authorization and GATEWAY_KEY not in request
            and any(s.caller_key for s in snapshot.statuses)):
        return await gateway.catalog.for_caller(snapshot, authorization)
    return snapshot


def _visible_models(request: web.Request, gateway: Gateway, snapshot: Snapshot
                    ) -> list[dict[str, Any]]:
    """The models listing, narrowed to what the caller's gateway key may use."""
    router = gateway.router
    entries = router.models(snapshot)
    key = request.get(GATEWAY_KEY)
    if key is None:
        return entries
    return [entry for entry in entries
            if key.allows(*_model_names(entry["id"], router.route_of(entry["id"], snapshot)))]


def _model_names(model: str, route: Route | None) -> tuple[str, ...]:
    """The names a key's model patterns are matched against: the name the client sends
    and, when it routes somewhere, its ``provider/model`` route."""
    if route is None:
        return (model,)
    return model, f"{route.provider.name}/{route.upstream_model}"


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the worker's loop answers. No upstream I/O."""
    worker = request.app[WORKER].index
    return json_response({"status": "ok", "worker": worker, "pid": os.getpid()})


async def health(request: web.Request) -> web.Response:
    """Every provider probed in parallel (cached ``health_cache_ttl`` seconds); 200 when
    at least one is healthy. Shows names, latencies and errors, never credentials."""
    providers = await provider_view(request.app[LIVE].gateway)
    status, healthy = overall(providers)
    return json_response({"status": status, "providers": providers},
                         status=200 if healthy else 503)


async def provider_view(gateway: Gateway) -> list[dict[str, Any]]:
    """Each provider as ``/health`` and the status page show it: its probe (cached
    ``health_cache_ttl`` seconds), and this worker's concurrency limiter and breaker."""
    catalog, dispatcher = gateway.catalog, gateway.dispatcher
    snapshot = await catalog.fresh(gateway.config.health_cache_ttl)
    return [{
        "name": s.provider, "type": s.type, "status": "healthy" if s.healthy else "unhealthy",
        "latency_ms": s.latency_ms, "models": len(s.models), "error": s.error,
        "needs_caller_key": s.caller_key,
        "last_error": catalog.last_error(s.provider),
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.checked_at)),
        "concurrency": dispatcher.limits(s.provider),
        "breaker": dispatcher.breaker(s.provider),
    } for s in snapshot.statuses]


def overall(providers: list[dict[str, Any]]) -> tuple[str, int]:
    """The gateway's status from its providers', and how many are healthy."""
    healthy = sum(1 for p in providers if p["status"] == "healthy")
    status = "ok" if healthy == len(providers) else "degraded" if healthy else "unavailable"
    return status, healthy


async def status_page(request: web.Request) -> web.Response:
    """``GET /ui``: the status page. It holds no figures, so it loads without a key;
    its script fetches them from ``/ui/stats`` with the admin key the operator types."""
    return web.Response(body=stats.PAGE.body, headers=stats.PAGE.headers)


async def status_stats(request: web.Request) -> web.Response:
    """``GET /ui/stats``: the page's figures (``observe/status.py``); an admin key when the
    gateway has keys. Providers are this worker's view; counters are the metrics'."""
    gateway = request.app[LIVE].gateway
    require_admin(request.get(GATEWAY_KEY), gateway.keyring)
    providers = await provider_view(gateway)
    request.app[OBSERVERS].flush()  # this worker's figures, exact (observe/observers.py)
    now = stats.sample(request.app[METRICS].collect())
    state, _ = overall(providers)
    worker = request.app[WORKER]
    body = {"status": state, "worker": worker.index, "pid": os.getpid(),
            "time": time.time(), "totals": stats.totals(now),
            "live": stats.live(request.app[stats.HISTORY].add(now)),
            "providers": stats.provider_rows(providers, now)}
    return json_response(body, headers=stats.NO_STORE)


async def gateway_only(request: web.Request) -> web.Response:
    """Another method on a path the gateway answers itself (``/v1/usage``): a 405, not a
    request passed on to a provider by the ``/v1/`` catch-all."""
    raise MethodNotAllowed(f"Method {request.method} is not allowed on {request.path}.")


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: the Prometheus text format (``observe/metrics.py``); with gateway keys
    configured, for an admin key only. Gzip'ed for a scraper that accepts it (Prometheus
    does): every model, provider and key adds series, and the text shrinks ~10x."""
    gateway = request.app[LIVE].gateway
    require_admin(request.get(GATEWAY_KEY), gateway.keyring)
    request.app[OBSERVERS].flush()  # this worker's figures, exact (observe/observers.py)
    headers = CIMultiDict({"Content-Type": CONTENT_TYPE_LATEST})
    body = await maybe_gzip(gateway.config.compression, request.headers.get(ACCEPT_ENCODING),
                            headers, request.app[METRICS].exposition())
    return web.Response(body=body, headers=headers)


def json_response(body: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body),
                        content_type="application/json", headers=headers)


async def large_json_response(request: web.Request, gateway: Gateway, body: dict[str, Any]
                              ) -> web.Response:
    """``json_response`` for the gateway's own answers that can be large (300 models
    listed are ~23 KiB of JSON, 1.3 KiB gzip'ed): compressed as a proxied answer would be
    (``compression.py``)."""
    data = orjson.dumps(body)
    headers = CIMultiDict({"Content-Type": "application/json"})
    data = await maybe_gzip(gateway.config.compression, request.headers.get(ACCEPT_ENCODING),
                            headers, data)
    return web.Response(body=data, headers=headers)
