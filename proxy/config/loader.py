"""One frozen configuration, built once at start-up from defaults, a YAML file, the
environment and command-line flags (each overriding the one before).

The rest of the gateway receives a :class:`Config` and never reads ``os.environ``: the
CLI hands the environment to :func:`load_config` once. Problems are collected, not raised
one by one, so an operator sees every mistake in the file at once, each with its key path
(``providers[1].base_url: must start with http:// or https://``); unknown keys are
rejected (a typo must not silently become a default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from proxy.config import validate as v
from proxy.config.breaker import BreakerSettings, parse_breaker
from proxy.config.compression import CompressionConfig, parse_compression
from proxy.config.keys import parse_keys, read_keys_file
from proxy.config.logs import LoggingSettings, parse_logging
from proxy.config.providers import (
    ProviderConfig,
    parse_providers,
    providers_from_env,
    upstream_provider,
)
from proxy.config.redis import BACKENDS, RedisSettings, check_backends, parse_redis
from proxy.config.routes import (
    EMPTY,
    DeploymentRef,
    Routable,
    check_references,
    parse_aliases,
    parse_deployments,
    parse_fallbacks,
)
from proxy.config.sections import (
    AuthConfig,
    CacheConfig,
    DedupConfig,
    LimitsConfig,
    PoolConfig,
    RetryConfig,
    ServerConfig,
    UsageConfig,
    parse_limits,
)
from proxy.config.timeouts import Timeouts, parse_timeouts

DEFAULT_CONFIG_FILE = Path("proxy.yaml")
DEMO_PROVIDER = "mock"

# Environment overrides: variable -> key path in the file's structure.
ENV_OVERRIDES = {
    "PROXY_HOST": ("server", "host"),
    "PROXY_PORT": ("server", "port"),
    "PROXY_MAX_BODY_BYTES": ("server", "max_body_bytes"),
    "PROXY_WORKERS": ("server", "workers"),
    "PROXY_SOCKET_DIR": ("server", "socket_dir"),
    "PROXY_SHUTDOWN_GRACE": ("server", "shutdown_grace"),
    "PROXY_MAX_HEADER_BYTES": ("server", "max_header_bytes"),
    "PROXY_HEADER_TIMEOUT": ("server", "header_timeout"),
    "PROXY_BODY_TIMEOUT": ("server", "body_timeout"),
    "PROXY_KEEPALIVE_TIMEOUT": ("server", "keepalive_timeout"),
    "PROXY_MAX_CONNECTIONS": ("server", "max_connections"),
    "PROXY_CONNECT_TIMEOUT": ("timeouts", "connect"),
    "PROXY_READ_TIMEOUT": ("timeouts", "read"),
    "PROXY_TOTAL_TIMEOUT": ("timeouts", "total"),
    "PROXY_DISCOVERY_TIMEOUT": ("timeouts", "discovery"),
    "PROXY_MODELS_CACHE_TTL": ("models_cache_ttl",),
    "PROXY_REDIS_URL": ("redis", "url"),  # may hold a password: an env var keeps it out of files
    "PROXY_LOG_LEVEL": ("logging", "level"),
    "PROXY_LOG_FORMAT": ("logging", "format"),
}


class ConfigError(Exception):
    """Raised with every problem found; the CLI prints one per line and exits 2."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    pool: PoolConfig = field(default_factory=PoolConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    retries: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    usage: UsageConfig = field(default_factory=UsageConfig)
    models_cache_ttl: float = 300.0
    health_cache_ttl: float = 5.0
    providers: tuple[ProviderConfig, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=lambda: EMPTY)
    deployments: Mapping[str, tuple[DeploymentRef, ...]] = field(default_factory=lambda: EMPTY)
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: EMPTY)
    source: str = "defaults"

    def provider(self, name: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)


@dataclass(frozen=True)
class Overrides:
    """Command-line flags; ``None`` means "not given"."""

    config_path: Path | None = None
    upstream: str | None = None
    upstream_api_key_env: str | None = None
    host: str | None = None
    port: int | None = None
    workers: int | None = None
    socket_dir: str | None = None
    log_level: str | None = None


def load_config(
    overrides: Overrides, env: Mapping[str, str], provider_types: Collection[str], *,
    reloading: bool = False,
) -> Config:
    """Build the config; raises :class:`ConfigError` listing every problem. A reload
    (``reloading``) refuses an empty file: one caught half-written, or emptied, must
    not put the defaults (no providers, no keys) in force."""
    path = config_file(overrides, env)
    raw, source, problems = _read_file(path)
    if reloading and path is not None and not raw:
        raise ConfigError([f"{path}: the file is empty (being written?); a reload needs "
                           "the whole config"])
    _apply_env(raw, env)
    for key in ("host", "port", "workers", "socket_dir"):
        if (value := getattr(overrides, key)) is not None:
            raw.setdefault("server", {})[key] = value
    if overrides.log_level is not None:
        logs = raw.get("logging")
        if logs is None or isinstance(logs, dict):
            raw["logging"] = {**(logs or {}), "level": overrides.log_level}
    if overrides.upstream is not None:
        raw["providers"] = [upstream_provider(overrides.upstream, overrides.upstream_api_key_env)]
        source += " + --upstream"
    elif "providers" not in raw and source == "defaults":
        raw["providers"] = providers_from_env(env)
        source = "environment" if raw["providers"] else "defaults (demo upstream)"
    config = config_from_dict(raw, env, provider_types, problems)
    return dataclasses.replace(config, source=source)


def config_from_dict(
    raw: dict[str, Any], env: Mapping[str, str], provider_types: Collection[str],
    found: Collection[str] = (),
) -> Config:
    """Validate an already-read config structure (what the YAML file holds); ``found``:
    problems seen in the file's text, reported with the rest."""
    problems = list(found)
    config = _build(raw, env, provider_types, problems)
    if problems:
        raise ConfigError(problems)
    return config


def with_demo_provider(config: Config, base_url: str) -> Config:
    """Config served when nothing else is configured: the bundled mock upstream."""
    demo = ProviderConfig(name=DEMO_PROVIDER, type="openai_compat", base_url=base_url,
                          catch_all=True)
    return dataclasses.replace(config, providers=(demo,))


def config_file(overrides: Overrides, env: Mapping[str, str]) -> Path | None:
    """The file ``load_config`` reads: ``--config``, ``PROXY_CONFIG``, else
    ``./proxy.yaml`` if present. The CLI pins it at start-up, so that a reload after
    ``./proxy.yaml`` was deleted is refused instead of falling back to the defaults."""
    return overrides.config_path or _env_path(env)


def _env_path(env: Mapping[str, str]) -> Path | None:
    if env.get("PROXY_CONFIG"):
        return Path(env["PROXY_CONFIG"])
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _read_file(path: Path | None) -> tuple[dict[str, Any], str, list[str]]:
    """The file's structure, its name, and its duplicate keys (problems to report)."""
    if path is None:
        return {}, "defaults", []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file ({exc.strerror})"]) from None
    try:
        raw, duplicates = v.load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    if raw is None:
        return {}, str(path), []
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of keys"])
    return raw, str(path), duplicates


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for variable, key_path in ENV_OVERRIDES.items():
        if variable not in env:
            continue
        node = raw
        for key in key_path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
        node[key_path[-1]] = v.parse_scalar(env[variable])


def _build(
    raw: dict[str, Any], env: Mapping[str, str], types: Collection[str], problems: list[str]
) -> Config:
    v.known_keys(raw, "", Config.__dataclass_fields__.keys() - {"source"}, problems)
    server = v.section(raw.get("server"), "server", ServerConfig, problems, {
        "host": v.string, "port": v.port, "max_body_bytes": v.positive_int,
        "workers": v.positive_int, "socket_dir": v.string, "socket_mode": v.file_mode,
        "shutdown_grace": v.non_negative_number, "max_header_bytes": v.positive_int,
        "header_timeout": v.positive_number, "body_timeout": v.positive_number,
        "keepalive_timeout": v.positive_number, "max_connections": v.positive_int})
    if server.workers > 1 and server.port == 0:
        problems.append("server.port: must be a fixed port when server.workers > 1 "
                        "(the workers cannot share a randomly chosen port)")
    timeouts = parse_timeouts(raw.get("timeouts"), problems)
    pool = v.section(raw.get("pool"), "pool", PoolConfig, problems, {
        "limit": v.non_negative_int, "keepalive_timeout": v.non_negative_number})
    dedup = v.section(raw.get("dedup"), "dedup", DedupConfig, problems, {
        "mode": v.one_of("deterministic", "all", "off"), "max_buffer_bytes": v.positive_int})
    cache = v.section(raw.get("cache"), "cache", CacheConfig, problems, {
        "enabled": v.boolean, "ttl": v.positive_number, "max_bytes": v.positive_int,
        "max_entry_bytes": v.positive_int, "backend": v.one_of(*BACKENDS)})
    limits = parse_limits(raw.get("limits"), problems)
    auth = _auth(raw.get("auth"), problems)
    redis = parse_redis(raw.get("redis"), problems)
    usage = v.section(raw.get("usage"), "usage", UsageConfig, problems, {
        "backend": v.one_of(*BACKENDS), "flush_interval": v.positive_number})
    check_backends(redis, {"auth.limits_backend": auth.limits_backend,
                           "cache.backend": cache.backend if cache.enabled else "memory",
                           "usage.backend": usage.backend}, problems)
    retries = v.section(raw.get("retries"), "retries", RetryConfig, problems, {
        "max_attempts": v.positive_int, "base_delay": v.positive_number,
        "max_delay": v.positive_number, "max_retry_after": v.non_negative_number,
        "budget": v.non_negative_number})
    providers = parse_providers(raw.get("providers", []), env, types, problems)
    aliases = parse_aliases(raw.get("aliases", {}), problems)
    deployments = parse_deployments(raw.get("deployments"), {p.name for p in providers},
                                    aliases, problems)
    fallbacks = parse_fallbacks(raw.get("fallbacks"), problems)
    check_references(aliases, fallbacks, Routable(
        frozenset(p.name for p in providers),
        frozenset((*(m for p in providers for m in p.models), *deployments)),
        any(p.catch_all for p in providers)), problems)
    return Config(
        server=server, timeouts=timeouts, pool=pool, dedup=dedup, cache=cache, limits=limits,
        auth=auth, retries=retries, breaker=parse_breaker(raw.get("breaker"), problems),
        redis=redis, usage=usage,
        compression=parse_compression(raw.get("compression"), problems),
        logging=parse_logging(raw.get("logging"), problems),
        providers=providers, aliases=aliases, deployments=deployments,
        fallbacks=fallbacks,
        models_cache_ttl=v.check(v.non_negative_number, raw, "models_cache_ttl", "", 300.0,
                                 problems),
        health_cache_ttl=v.check(v.non_negative_number, raw, "health_cache_ttl", "", 5.0,
                                 problems),
    )


def _auth(raw: Any, problems: list[str]) -> AuthConfig:
    if raw is None:
        return AuthConfig()
    if not isinstance(raw, dict):
        problems.append("auth: must be a mapping")
        return AuthConfig()
    v.known_keys(raw, "auth", ("keys", "keys_file", "limits_backend"), problems)
    keys = parse_keys(raw.get("keys"), problems)
    keys_file = v.check(v.string, raw, "keys_file", "auth", None, problems)
    if keys_file is not None:
        before = len(problems)
        filed = parse_keys(read_keys_file(keys_file, problems), problems,
                           f"auth.keys_file ({keys_file})", known=keys)
        if not filed and len(problems) == before:  # (a file caught half-written, say)
            problems.append(f"auth.keys_file: {keys_file} holds no keys; an empty file "
                            "would open the gateway to anyone")
        keys += filed
    return AuthConfig(keys=keys, limits_backend=v.check(
        v.one_of(*BACKENDS), raw, "limits_backend", "auth", "memory", problems),
        open_on_purpose=raw.get("keys") == [] and keys_file is None)

