"""The ``providers:`` list of the config file: one :class:`ProviderConfig` per upstream.

Split from ``config/loader.py`` so each file stays one concern: this one knows what a provider
entry may hold and where providers come from when the file names none (the environment,
or ``--upstream``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from proxy.config import validate as v
from proxy.config.timeouts import TimeoutOverrides, parse_overrides

# Providers taken from the environment when no config file and no --upstream is given.
ENV_PROVIDERS = (
    ("openai", "openai_compat", "OPENAI_API_KEY", "OPENAI_BASE_URL", "https://api.openai.com/v1"),
    ("openrouter", "openai_compat", "OPENROUTER_API_KEY", None, "https://openrouter.ai/api/v1"),
)


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    type: str
    base_url: str
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    models: tuple[str, ...] = ()
    catch_all: bool = False
    forward_client_auth: bool = True
    ca_file: str | None = None  # PEM file of CAs to trust for an https base_url
    # What it changes of the global timeouts, key by key.
    timeouts: TimeoutOverrides = field(default_factory=TimeoutOverrides)
    # May the gateway add ``stream_options.include_usage`` to a stream whose client did
    # not ask (usage accounting, issue 10)? False for an upstream that rejects the field.
    stream_usage: bool = True

    @property
    def api_key_missing(self) -> bool:
        return self.api_key_env is not None and not self.api_key


def upstream_provider(url: str, api_key_env: str | None) -> dict[str, Any]:
    """The ``--upstream`` drop-in: one provider that takes every model and path."""
    entry: dict[str, Any] = {"name": "upstream", "type": "openai_compat", "base_url": url}
    entry["catch_all"] = True
    if api_key_env:
        entry["api_key_env"] = api_key_env
    return entry


def providers_from_env(env: Mapping[str, str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for name, type_, key_env, url_env, url in ENV_PROVIDERS:
        if env.get(key_env):
            base_url = env.get(url_env, url) if url_env else url
            found.append({"name": name, "type": type_, "base_url": base_url,
                          "api_key_env": key_env})
    if env.get("OLLAMA_HOST"):
        host = env["OLLAMA_HOST"]
        base_url = host if host.startswith(("http://", "https://")) else f"http://{host}"
        found.append({"name": "ollama", "type": "ollama", "base_url": base_url})
    return found


def parse_providers(
    items: Any, env: Mapping[str, str], types: Collection[str], problems: list[str]
) -> tuple[ProviderConfig, ...]:
    if not isinstance(items, list):
        problems.append("providers: must be a list of providers")
        return ()
    built: list[ProviderConfig] = []
    for index, item in enumerate(items):
        provider = _provider(item, f"providers[{index}]", env, types, problems)
        if provider is None:
            continue
        if any(p.name == provider.name for p in built):
            problems.append(f"providers[{index}].name: duplicate provider name '{provider.name}'")
        built.append(provider)
    return tuple(built)


def _provider(
    item: Any, path: str, env: Mapping[str, str], types: Collection[str], problems: list[str]
) -> ProviderConfig | None:
    if not isinstance(item, dict):
        problems.append(f"{path}: must be a mapping with name, type and base_url")
        return None
    allowed = ProviderConfig.__dataclass_fields__.keys() - {"api_key"}
    v.known_keys(item, path, allowed, problems)
    before = len(problems)
    name = v.required(v.provider_name, item, "name", path, problems)
    type_ = v.required(v.string, item, "type", path, problems)
    if isinstance(type_, str) and type_ not in types:
        known = ", ".join(sorted(types))
        problems.append(f"{path}.type: unknown provider type '{type_}' (known: {known})")
    base_url = v.required(v.url, item, "base_url", path, problems)
    key_env = v.check(v.env_name, item, "api_key_env", path, None, problems)
    headers: dict[str, str] = v.check(v.header_map, item, "headers", path, {}, problems)
    models: list[str] = v.check(v.string_list, item, "models", path, [], problems)
    catch_all = v.check(v.boolean, item, "catch_all", path, False, problems)
    forward = v.check(v.boolean, item, "forward_client_auth", path, key_env is None, problems)
    ca_file = v.check(v.readable_file, item, "ca_file", path, None, problems)
    timeouts = parse_overrides(item.get("timeouts"), f"{path}.timeouts", problems)
    stream_usage = v.check(v.boolean, item, "stream_usage", path, True, problems)
    api_key = _api_key(env, key_env, path, problems) if key_env else None
    if len(problems) > before:
        return None
    return ProviderConfig(
        name=name, type=type_, base_url=base_url.rstrip("/"), api_key_env=key_env,
        api_key=api_key, headers=MappingProxyType(dict(headers)),
        models=tuple(models), catch_all=catch_all, forward_client_auth=forward,
        ca_file=ca_file, timeouts=timeouts, stream_usage=stream_usage,
    )


def _api_key(env: Mapping[str, str], key_env: str, path: str, problems: list[str]
             ) -> str | None:
    """The key in ``key_env``, without the surrounding whitespace a key file's last
    newline leaves; a key with a line break or control character inside would break
    (or add to) the upstream request's head, so it is refused, never shown."""
    key = env.get(key_env)
    if key is None:
        return None
    key = key.strip()
    if not key.isprintable() or not key.isascii():
        problems.append(f"{path}.api_key_env: the value of {key_env} is not one line of "
                        "printable ASCII (the key is not shown)")
        return None
    return key or None
