"""The config file's routing tables: ``aliases``, ``deployments`` and ``fallbacks``.

``deployments`` names the providers that serve one model, so the gateway balances them
and fails over between them (issue #4)::

    deployments:
      gpt-4o: [openai, azure/gpt-4o-east]   # "provider" or "provider/upstream-model"
    fallbacks:
      gpt-4o: [gpt-4o-mini]                 # tried, in order, when every deployment failed

Fallbacks are one level deep: a fallback model's own fallbacks are not followed, so a
chain can never loop. Aliases do not chain either (the router resolves an alias's target
as a model name, never as another alias), so an alias naming an alias is refused, loops
included; so is an alias or fallback whose ``provider/`` prefix names no provider and
that nothing else could serve (issue 9: config that loads but cannot work).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

# One deployment: the provider's name and the model name sent to it (None: the same name
# the client asked for).
DeploymentRef = tuple[str, str | None]

EMPTY: Mapping[str, Any] = MappingProxyType({})


def parse_aliases(raw: Any, problems: list[str]) -> Mapping[str, str]:
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(t, str) and k and t for k, t in raw.items()
    ):
        problems.append("aliases: must map alias names to model names (strings)")
        return EMPTY
    return MappingProxyType(dict(raw))


@dataclass(frozen=True)
class Routable:
    """What a name in ``aliases`` or ``fallbacks`` may reach, known at load time."""

    providers: frozenset[str]
    models: frozenset[str]  # the providers' static models and the deployment groups
    catch_all: bool  # a catch-all provider takes any name

    def unknown_provider(self, name: str) -> str | None:
        """Why ``name`` cannot route: a ``prefix/`` that is no provider's name, for a
        name no static list or group holds (None: it may route). With no provider at
        all the demo mock takes every name, so nothing is refused."""
        prefix, slash, _ = name.partition("/")
        if (not slash or not self.providers or self.catch_all or prefix in self.providers
                or name in self.models):
            return None
        known = ", ".join(sorted(self.providers))
        return (f"'{name}' names no known provider '{prefix}' (known: {known}); a model "
                f"whose own name has a '/' is written with its provider: "
                f"'<provider>/{name}'")


def check_references(aliases: Mapping[str, str], fallbacks: Mapping[str, tuple[str, ...]],
                     routable: Routable, problems: list[str]) -> None:
    """Alias loops and chains, and alias or fallback targets that cannot route."""
    for alias, target in aliases.items():
        path = f"aliases.{alias}"
        if target in aliases:
            problems.append(f"{path}: {_chain(alias, aliases)}")
        elif (why := routable.unknown_provider(target)) is not None:
            problems.append(f"{path}: {why}")
    for model, targets in fallbacks.items():
        for index, target in enumerate(targets):
            if target not in aliases and (why := routable.unknown_provider(target)):
                problems.append(f"fallbacks.{model}[{index}]: {why}")


def _chain(alias: str, aliases: Mapping[str, str]) -> str:
    """The problem with an alias whose target is an alias: a loop, or a chain."""
    seen = [alias]
    while (step := aliases.get(seen[-1])) is not None and step not in seen:
        seen.append(step)
    if step is not None:
        if step == alias:
            loop = " -> ".join([*seen, step])
            return ("an alias cannot name itself" if len(seen) == 1
                    else f"alias loop: {loop}")
        return f"'{seen[1]}' is an alias that leads into a loop; aliases do not chain"
    return (f"'{seen[1]}' is itself an alias, and aliases do not chain: name its target "
            f"'{aliases[seen[1]]}' instead")


def parse_deployments(raw: Any, providers: Collection[str], aliases: Collection[str],
                      problems: list[str]) -> Mapping[str, tuple[DeploymentRef, ...]]:
    names = _model_lists(raw, "deployments", "provider names", problems)
    parsed: dict[str, tuple[DeploymentRef, ...]] = {}
    for model, entries in names.items():
        path = f"deployments.{model}"
        if model in aliases:
            problems.append(f"{path}: '{model}' is also an alias; a name is one or the other")
        prefix, slash, _ = model.partition("/")
        if slash and prefix in providers:
            problems.append(f"{path}: '{model}' would never be used: the 'provider/model' "
                            f"rule sends it to provider '{prefix}'")
        refs: list[DeploymentRef] = []
        for index, entry in enumerate(entries):
            provider, _, upstream = entry.partition("/")
            if provider not in providers:
                known = ", ".join(sorted(providers)) or "none"
                problems.append(f"{path}[{index}]: unknown provider '{provider}' "
                                f"(known: {known})")
            ref = (provider, upstream or None)
            if ref in refs:
                problems.append(f"{path}[{index}]: '{entry}' is listed twice")
            refs.append(ref)
        parsed[model] = tuple(refs)
    return MappingProxyType(parsed)


def parse_fallbacks(raw: Any, problems: list[str]) -> Mapping[str, tuple[str, ...]]:
    lists = _model_lists(raw, "fallbacks", "model names", problems)
    for model, targets in lists.items():
        if model in targets:
            problems.append(f"fallbacks.{model}: a model cannot be its own fallback")
    return MappingProxyType(lists)


def _model_lists(raw: Any, path: str, what: str, problems: list[str]
                 ) -> dict[str, tuple[str, ...]]:
    """``{model: [non-empty strings]}``; each bad entry reported with its key path."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"{path}: must map model names to lists of {what}")
        return {}
    lists: dict[str, tuple[str, ...]] = {}
    for model, entries in raw.items():
        if not isinstance(model, str) or not model:
            problems.append(f"{path}: keys must be model names (non-empty strings)")
            continue
        if not isinstance(entries, list) or not entries or not all(
                isinstance(e, str) and e for e in entries):
            problems.append(f"{path}.{model}: must be a non-empty list of {what}")
            continue
        lists[model] = tuple(entries)
    return lists
