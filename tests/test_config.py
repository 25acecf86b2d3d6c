"""The frozen config (issue #2, "Configuration"): defaults < file < environment < flags,
every problem reported at once with its key path, and the CLI's exit status 2."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from proxy.config.loader import Config, ConfigError, Overrides, config_from_dict, load_config
from proxy.providers import PROVIDER_TYPES

TYPES = PROVIDER_TYPES.keys()
SECRET = "sk-or-secret-value"

ISSUE_YAML = """\
server: {host: 127.0.0.1, port: 8080, max_body_bytes: 33554432}
timeouts: {connect: 5, read: 300}
models_cache_ttl: 300
providers:
  - name: openrouter
    type: openai_compat            # key in the provider registry
    base_url: https://openrouter.example/api/v1/
    api_key_env: OPENROUTER_API_KEY
    headers: {X-Title: my-app}      # optional extra upstream headers
    models: [meta-llama/llama-3.1-8b-instruct]   # optional; otherwise discovered
  - name: local
    type: ollama
    base_url: http://127.0.0.1:11434
aliases: {fast: local/llama3.2:1b}
"""

BAD_YAML = """\
server: {prot: 80, port: eighty}
timeouts: {read: -1}
providers:
  - {name: a, type: openai_compat, base_url: http://127.0.0.1:1/v1}
  - {name: b, type: openai_compat, base_url: ftp://example.com}
  - {name: c, type: grpc, base_url: http://127.0.0.1:2/v1}
  - {name: a, type: ollama, base_url: http://127.0.0.1:3}
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(env: Mapping[str, str] | None = None, **overrides: object) -> Config:
    return load_config(Overrides(**overrides), env or {}, TYPES)  # type: ignore[arg-type]


def problems_of(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(config_path=write(tmp_path, text))
    return caught.value.problems


@pytest.fixture
def empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a directory without ``proxy.yaml``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults() -> None:
    config = config_from_dict({}, {}, TYPES)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.server.max_body_bytes == 32 * 1024 * 1024
    assert (config.timeouts.connect, config.timeouts.read) == (5.0, 300.0)
    assert config.models_cache_ttl == 300.0
    assert config.providers == ()
    assert dict(config.aliases) == {}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.models_cache_ttl = 1  # type: ignore[misc]


def test_the_issue_example_loads(tmp_path: Path) -> None:
    path = write(tmp_path, ISSUE_YAML)
    config = load({"OPENROUTER_API_KEY": SECRET}, config_path=path)
    assert config.source == str(path)
    assert config.server.max_body_bytes == 33554432
    assert (config.timeouts.connect, config.timeouts.read) == (5.0, 300.0)
    router, local = config.providers
    assert (router.name, router.type, local.name, local.type) == (
        "openrouter", "openai_compat", "local", "ollama")
    assert router.base_url == "https://openrouter.example/api/v1"  # trailing / stripped
    assert local.base_url == "http://127.0.0.1:11434"
    assert dict(router.headers) == {"X-Title": "my-app"}
    assert router.models == ("meta-llama/llama-3.1-8b-instruct",)
    assert local.models == ()
    assert router.api_key_env == "OPENROUTER_API_KEY"
    assert router.api_key == SECRET
    assert router.forward_client_auth is False
    assert local.api_key is None
    assert dict(config.aliases) == {"fast": "local/llama3.2:1b"}
    assert SECRET not in repr(config)
    assert SECRET not in str(config.providers)


def test_missing_api_key_env_is_reported_not_fatal(tmp_path: Path) -> None:
    config = load(config_path=write(tmp_path, ISSUE_YAML))
    assert config.providers[0].api_key is None
    assert config.providers[0].api_key_missing is True


def test_every_problem_is_reported_at_once_with_its_key_path(tmp_path: Path) -> None:
    problems = problems_of(BAD_YAML, tmp_path)
    assert len(problems) == 6, problems
    by_key = {p.split(":", 1)[0]: p for p in problems}
    assert sorted(by_key) == ["providers[1].base_url", "providers[2].type",
                              "providers[3].name", "server.port", "server.prot",
                              "timeouts.read"]
    assert by_key["providers[1].base_url"] == (
        "providers[1].base_url: must start with http:// or https://")
    assert "'grpc'" in by_key["providers[2].type"]
    assert "openai_compat" in by_key["providers[2].type"]
    assert "ollama" in by_key["providers[2].type"]
    assert "duplicate" in by_key["providers[3].name"]
    assert "'a'" in by_key["providers[3].name"]
    assert by_key["server.port"] == "server.port: must be an integer"
    assert "unknown key" in by_key["server.prot"]
    assert "-1" in by_key["timeouts.read"]


@pytest.mark.parametrize(("text", "expected"), [
    ("timeouts: {connect: -0.5}", "timeouts.connect: must be greater than 0 (got -0.5)"),
    ("providers: [{name: x, type: openai_compat}]", "providers[0].base_url: is required"),
    ("providers: [{name: x, type: openai_compat, base_url: 'http://h', colour: red}]",
     "providers[0].colour: unknown key"),
    ("providers: [{name: x, type: openai_compat, base_url: 'http://h', models: bad}]",
     "providers[0].models: must be a list of non-empty strings"),
    ("unknown_top: 1", "unknown_top: unknown key"),
    ("server: {port: 70000}", "server.port: must be a port number between 0 and 65535"),
])
def test_single_problem_messages(tmp_path: Path, text: str, expected: str) -> None:
    problems = problems_of(text, tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("server: [unclosed", "invalid YAML"),
    ("- just\n- a list\n", "the top level must be a mapping"),
])
def test_unreadable_files(tmp_path: Path, text: str, expected: str) -> None:
    problems = problems_of(text, tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith(str(tmp_path / "config.yaml"))
    assert expected in problems[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(config_path=tmp_path / "absent.yaml")
    assert caught.value.problems == [
        f"{tmp_path / 'absent.yaml'}: cannot read config file (No such file or directory)"]


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {host: 10.0.0.5, port: 9000}\ntimeouts: {read: 100}\n")
    from_file = load(config_path=path)
    assert (from_file.server.host, from_file.server.port) == ("10.0.0.5", 9000)
    assert from_file.timeouts.read == 100.0
    assert from_file.timeouts.connect == 5.0  # not in the file: the default
    env = {"PROXY_PORT": "9100", "PROXY_HOST": "10.0.0.6", "PROXY_READ_TIMEOUT": "42"}
    from_env = load(env, config_path=path)
    assert (from_env.server.host, from_env.server.port) == ("10.0.0.6", 9100)
    assert from_env.timeouts.read == 42.0
    from_flags = load(env, config_path=path, host="0.0.0.0", port=9200)
    assert (from_flags.server.host, from_flags.server.port) == ("0.0.0.0", 9200)
    assert from_flags.timeouts.read == 42.0


def test_bad_env_value_is_reported_with_key_path(empty_dir: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load({"PROXY_PORT": "http"})
    assert caught.value.problems == ["server.port: must be an integer"]


def test_proxy_yaml_in_the_working_directory_is_used(empty_dir: Path) -> None:
    write(empty_dir, "server: {port: 9300}\n", name="proxy.yaml")
    config = load()
    assert config.server.port == 9300
    assert config.source == "proxy.yaml"
    other = write(empty_dir, "server: {port: 9400}\n")
    assert load(config_path=other).server.port == 9400  # --config wins over ./proxy.yaml


def test_proxy_config_env_var_names_the_file(empty_dir: Path) -> None:
    path = write(empty_dir, "server: {port: 9500}\n", name="elsewhere.yaml")
    assert load({"PROXY_CONFIG": str(path)}).server.port == 9500


def test_upstream_flag_is_one_catch_all_provider(empty_dir: Path) -> None:
    config = load({"OPENAI_API_KEY": "sk-ignored"}, upstream="http://127.0.0.1:9999/v1/")
    (provider,) = config.providers
    assert (provider.name, provider.type) == ("upstream", "openai_compat")
    assert provider.base_url == "http://127.0.0.1:9999/v1"
    assert provider.catch_all is True
    assert provider.forward_client_auth is True
    assert (provider.api_key_env, provider.api_key) == (None, None)


def test_upstream_flag_with_key_env_replaces_client_auth(empty_dir: Path) -> None:
    config = load({"UP_KEY": "sk-up"}, upstream="http://127.0.0.1:9999/v1",
                  upstream_api_key_env="UP_KEY")
    (provider,) = config.providers
    assert (provider.api_key_env, provider.api_key) == ("UP_KEY", "sk-up")
    assert provider.forward_client_auth is False
    assert provider.catch_all is True


def test_upstream_flag_replaces_the_file_providers(tmp_path: Path) -> None:
    path = write(tmp_path, ISSUE_YAML)
    config = load(config_path=path, upstream="http://127.0.0.1:9999/v1")
    assert [p.name for p in config.providers] == ["upstream"]
    assert dict(config.aliases) == {"fast": "local/llama3.2:1b"}


def test_openai_key_in_env_gives_an_openai_provider(empty_dir: Path) -> None:
    (provider,) = load({"OPENAI_API_KEY": "sk-openai"}).providers
    assert (provider.name, provider.type) == ("openai", "openai_compat")
    assert provider.base_url == "https://api.openai.com/v1"
    assert provider.api_key == "sk-openai"
    assert provider.forward_client_auth is False


def test_ollama_host_in_env_gives_an_ollama_provider(empty_dir: Path) -> None:
    (provider,) = load({"OLLAMA_HOST": "127.0.0.1:11434"}).providers
    assert (provider.name, provider.type) == ("ollama", "ollama")
    assert provider.base_url == "http://127.0.0.1:11434"


def test_nothing_configured_means_demo_mode(empty_dir: Path) -> None:
    config = load()
    assert config.providers == ()
    assert "demo" in config.source


def test_cli_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    bad = write(tmp_path, BAD_YAML, name="bad.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(bad)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 6, done.stderr
    assert all(line.startswith("config error: ") for line in lines)
    keys = sorted(line.removeprefix("config error: ").split(":", 1)[0] for line in lines)
    assert keys == ["providers[1].base_url", "providers[2].type", "providers[3].name",
                    "server.port", "server.prot", "timeouts.read"]
    assert ("config error: providers[1].base_url: must start with http:// or https://"
            in lines)
    assert done.stdout == ""
