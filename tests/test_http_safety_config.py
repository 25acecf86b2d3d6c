"""The client-side limits' configuration (issue #4): the ``server.*`` keys are validated
with their key paths, have environment overrides, and the shipped nginx config keeps its
idle upstream connections for less time than the gateway does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.config.loader import ConfigError, Overrides, config_from_dict, load_config
from proxy.config.sections import ServerConfig
from proxy.providers import PROVIDER_TYPES
from tests.nginx_helpers import directives


def test_the_gateway_keeps_idle_connections_longer_than_nginx() -> None:
    """nginx must close an idle upstream connection before the gateway does, or it may
    send a request on a connection the gateway is closing at that moment (a 502)."""
    upstream_block = re.search(r"upstream\s+llm_gateway\s*\{([^}]*)\}", directives())
    assert upstream_block, "deploy/nginx.conf lost its upstream block"
    nginx = re.search(r"keepalive_timeout\s+(\d+)s?;", upstream_block[1])
    assert nginx, "deploy/nginx.conf: set keepalive_timeout in the upstream block"
    assert int(nginx[1]) < ServerConfig().keepalive_timeout


def test_the_safety_keys_are_validated_with_their_key_paths() -> None:
    raw = {"server": {"max_header_bytes": 0, "header_timeout": -1, "body_timeout": "soon",
                      "keepalive_timeout": 0, "max_connections": 1.5}}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw, {}, PROVIDER_TYPES.keys())
    assert caught.value.problems == [
        "server.max_header_bytes: must be greater than 0 (got 0)",
        "server.header_timeout: must be greater than 0 (got -1)",
        "server.body_timeout: must be a number",
        "server.keepalive_timeout: must be greater than 0 (got 0)",
        "server.max_connections: must be an integer",
    ]


def test_the_safety_keys_have_environment_overrides(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"PROXY_MAX_HEADER_BYTES": "8192", "PROXY_HEADER_TIMEOUT": "5",
           "PROXY_BODY_TIMEOUT": "30", "PROXY_KEEPALIVE_TIMEOUT": "90",
           "PROXY_MAX_CONNECTIONS": "100"}
    server = load_config(Overrides(), env, PROVIDER_TYPES.keys()).server
    assert (server.max_header_bytes, server.header_timeout, server.body_timeout,
            server.keepalive_timeout, server.max_connections) == (8192, 5.0, 30.0, 90.0, 100)
