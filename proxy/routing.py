"""Model name -> provider, in one documented order.

1. ``provider/model``: a known provider's name as prefix; the prefix is stripped.
2. an alias from ``aliases`` (its target is resolved by rules 1 and 3 to 6);
3. a ``deployments`` group: several providers serve the model, balanced by the
   dispatcher (least in flight) and failed over in turn;
4. a provider's static ``models`` list (first provider in config order wins);
5. the models discovered from providers without a static list;
6. a ``catch_all`` provider (``--upstream`` mode) takes any other name.

Anything else is ``model_not_found``. Requests without a model (a ``GET /v1/files``,
say) go to the catch-all provider, or to the only provider when there is one. A model
with ``fallbacks`` also carries, in its route, the deployments of each fallback model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from proxy.config.routes import EMPTY, DeploymentRef
from proxy.discovery import ModelCatalog, Snapshot
from proxy.errors import InvalidRequest, ModelNotFound
from proxy.providers import Provider

log = logging.getLogger("proxy.routing")

MODEL_CREATED = 0  # discovery does not know creation times; OpenAI's field is required


@dataclass(frozen=True, slots=True)
class Target:
    """One deployment a request may go to: a provider, and the model name it is sent."""

    provider: Provider
    upstream_model: str | None


@dataclass(frozen=True, slots=True)
class Route:
    provider: Provider
    upstream_model: str | None  # the name sent upstream; None for model-less requests
    # The other deployments of the same model, balanced with the first one.
    peers: tuple[Target, ...] = ()
    # Each fallback model's deployments, in order: tried when all of the above failed.
    fallbacks: tuple[tuple[Target, ...], ...] = ()

    @property
    def single(self) -> bool:
        """One provider and nothing to fail over to: the dispatcher's fast path."""
        return not self.peers and not self.fallbacks

    @property
    def deployments(self) -> tuple[Target, ...]:
        return (Target(self.provider, self.upstream_model), *self.peers)

    @property
    def label(self) -> str:
        """Names the route in sharing keys: requests that could be answered by the same
        deployments, under the same model names, share, whichever one a balancer would
        pick."""
        if self.single:  # the model sent upstream too: an alias may change on reload
            return f"{self.provider.name}/{self.upstream_model}"
        groups = (self.deployments, *self.fallbacks)
        return "|".join(",".join(f"{t.provider.name}/{t.upstream_model}" for t in group)
                        for group in groups)


class ModelRouter:
    def __init__(self, providers: Sequence[Provider], aliases: Mapping[str, str],
                 catalog: ModelCatalog,
                 deployments: Mapping[str, tuple[DeploymentRef, ...]] = EMPTY,
                 fallbacks: Mapping[str, tuple[str, ...]] = EMPTY):
        self.providers = tuple(providers)
        self._by_name = {p.name: p for p in providers}
        self._aliases = dict(aliases)
        self._groups = {model: tuple(Target(self._by_name[name], upstream or model)
                                     for name, upstream in refs)
                        for model, refs in deployments.items()}
        self._fallbacks = dict(fallbacks)
        self._unroutable: set[str] = set()  # fallback names already warned about
        self._catalog = catalog
        self._static: dict[str, Provider] = {}
        for provider in providers:
            for model in provider.config.models:
                self._static.setdefault(model, provider)
        self._catch_all = next((p for p in providers if p.config.catch_all), None)
        self._default = self._catch_all or (providers[0] if len(providers) == 1 else None)
        self._discovering = any(_discovers(p) for p in providers)

    def __repr__(self) -> str:
        return (f"<ModelRouter providers={len(self.providers)} aliases={len(self._aliases)} "
                f"static_models={len(self._static)}>")

    async def resolve(self, model: str | None) -> Route:
        if model is None:
            if self._default is None:
                raise InvalidRequest("The request must name a 'model'.", code="missing_model",
                                     param="model")
            return Route(self._default, None)
        route = self._lookup(model, self._catalog.snapshot)
        if self._discovering and self._catalog.snapshot is None and (
                route is None or route.provider is self._catch_all):
            # Before the first discovery ends, a discovered name must not fall to the
            # catch-all: wait for the catalog (only the first requests ever do).
            route = self._lookup(model, await self._catalog.current())
        if route is None:
            if self._discovering:
                self._catalog.refresh_soon()
            raise ModelNotFound(model)
        if self._fallbacks:
            return self._with_fallbacks(model, route)
        return route

    def _with_fallbacks(self, model: str, route: Route) -> Route:
        """The route plus its fallback models' deployments (those that route now)."""
        names = self._fallbacks.get(model) or self._fallbacks.get(self._aliases.get(model, ""))
        if not names:
            return route
        snapshot = self._catalog.snapshot
        groups: list[tuple[Target, ...]] = []
        for name in names:
            found = self._lookup(name, snapshot)
            if found is not None:
                groups.append(found.deployments)
            elif (snapshot is not None and name not in self._unroutable
                  and all(s.healthy for s in snapshot.statuses)):  # not a failed probe
                self._unroutable.add(name)  # a typo must not go unnoticed; once per name
                log.warning("fallbacks.%s: '%s' matches no provider's models; skipped",
                            model, name)
        return replace(route, fallbacks=tuple(groups))

    def route_of(self, model: str, snapshot: Snapshot | None) -> Route | None:
        """Where ``model`` goes with this catalog snapshot, without waiting for one."""
        return self._lookup(model, snapshot)

    def _lookup(self, model: str, snapshot: Snapshot | None) -> Route | None:
        route = self._prefixed(model)
        if route is None and model in self._aliases:
            return self._target(self._aliases[model], snapshot)
        return route or self._target(model, snapshot)

    def _target(self, model: str, snapshot: Snapshot | None) -> Route | None:
        """Rules 1 and 3 to 6: all but aliases (an alias never names an alias)."""
        route = self._prefixed(model) or self._group(model) or self._known(model, snapshot)
        if route is None and self._catch_all is not None:
            route = Route(self._catch_all, model)
        return route

    def _prefixed(self, model: str) -> Route | None:
        prefix, _, rest = model.partition("/")
        provider = self._by_name.get(prefix)
        return Route(provider, rest) if provider is not None and rest else None

    def _group(self, model: str) -> Route | None:
        group = self._groups.get(model)
        if group is None:
            return None
        first, *others = group
        return Route(first.provider, first.upstream_model, peers=tuple(others))

    def _known(self, model: str, snapshot: Snapshot | None) -> Route | None:
        provider = self._static.get(model)
        if provider is None and snapshot is not None:
            provider = next((p for p in self.providers if _discovers(p) and model in
                             _models(snapshot, p)), None)
        return Route(provider, model) if provider is not None else None

    def models(self, snapshot: Snapshot) -> list[dict[str, Any]]:
        """``GET /v1/models`` entries, ids as a client must send them: the bare name
        when it routes to this provider, else ``provider/model``; then the aliases."""
        listed: dict[str, dict[str, Any]] = {}
        for provider in self.providers:
            status = snapshot.status(provider.name)
            upstream = status.entries if status is not None else {}
            for model in _served(snapshot, provider):
                route = self._lookup(model, snapshot)
                bare = route is not None and route.provider is provider
                model_id = model if bare else f"{provider.name}/{model}"
                listed.setdefault(model_id, _entry(model_id, provider.name, upstream.get(model)))
        for group, targets in self._groups.items():
            listed.setdefault(group, _entry(group, targets[0].provider.name))
        for alias, target in self._aliases.items():
            route = self._lookup(target, snapshot)
            if route is not None and alias not in listed:
                listed[alias] = _entry(alias, route.provider.name)
        return list(listed.values())


def _discovers(provider: Provider) -> bool:
    return not provider.config.models and not provider.config.catch_all


def _served(snapshot: Snapshot, provider: Provider) -> tuple[str, ...]:
    return provider.config.models or _models(snapshot, provider)


def _models(snapshot: Snapshot, provider: Provider) -> tuple[str, ...]:
    status = snapshot.status(provider.name)
    return status.models if status is not None else ()


def _entry(model_id: str, owner: str, upstream: Mapping[str, Any] | None = None
           ) -> dict[str, Any]:
    """A listing entry; an upstream's own entry (a caller's drop-in listing) keeps its
    ``created`` and ``owned_by`` as the upstream sent them."""
    if upstream is not None:
        return {**upstream, "id": model_id, "object": "model",
                "created": upstream.get("created", MODEL_CREATED),
                "owned_by": upstream.get("owned_by", owner)}
    return {"id": model_id, "object": "model", "created": MODEL_CREATED, "owned_by": owner}
