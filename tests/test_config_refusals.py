"""Config that loads but cannot work is refused at load, each problem with its key path
(issue 9, part 3): an alias naming an unknown provider, an alias naming an alias (a
loop, or a chain the router never follows), a fallback naming an unknown provider, and
a key given twice in one YAML mapping (YAML keeps the last one silently), at any depth
and in ``auth.keys_file`` too. Through ``config_from_dict``, the YAML loader and the
real CLI (exit 2, ``config error: <path>: ...``, every problem listed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.config.keys import hash_secret
from proxy.config.loader import ConfigError, Overrides, config_from_dict, load_config
from proxy.providers import PROVIDER_TYPES
from tests.procs import clean_env

TYPES = PROVIDER_TYPES.keys()
A = {"name": "a", "type": "openai_compat", "base_url": "http://127.0.0.1:9/v1",
     "models": ["m", "org/slashed"]}
B = {"name": "b", "type": "openai_compat", "base_url": "http://127.0.0.1:10/v1"}


def problems_of(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"providers": [A, B], **raw}, {}, TYPES)
    return caught.value.problems


def file_problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(Overrides(config_path=path), {}, TYPES)
    return caught.value.problems


@pytest.mark.parametrize(("aliases", "expected"), [
    ({"fast": "nope/model"},
     ["aliases.fast: 'nope/model' names no known provider 'nope' (known: a, b)"]),
    ({"a1": "a1"}, ["aliases.a1: an alias cannot name itself"]),
    ({"x": "y", "y": "x"}, ["aliases.x: alias loop: x -> y -> x",
                            "aliases.y: alias loop: y -> x -> y"]),
    ({"x": "y", "y": "a/m"},
     ["aliases.x: 'y' is itself an alias, and aliases do not chain: name its target "
      "'a/m' instead"]),
])
def test_aliases_that_cannot_route_are_refused(aliases: dict[str, str],
                                               expected: list[str]) -> None:
    problems = problems_of({"aliases": aliases})
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problem


def test_fallbacks_naming_an_unknown_provider_are_refused() -> None:
    problems = problems_of({"fallbacks": {"m": ["b/x", "nope/x"]},
                            "deployments": {"g": ["a", "nope2/y"]}})
    assert sorted(p.split(":", 1)[0] for p in problems) == [
        "deployments.g[1]", "fallbacks.m[1]"], problems
    assert problems[1].startswith("fallbacks.m[1]: 'nope/x' names no known provider 'nope'")


def test_names_that_may_route_are_accepted() -> None:
    config = config_from_dict({"providers": [A, B], "aliases": {
        "p": "a/m",              # a provider prefix
        "s": "org/slashed",      # a static model whose own name has a '/'
        "g": "grp",              # a deployment group
        "d": "discovered-name",  # no '/': may be discovered
        "q": "b/org/other",      # a '/' model, written with its provider
    }, "deployments": {"grp": ["a", "b"]}, "fallbacks": {"m": ["p", "org/slashed"]}},
        {}, TYPES)
    assert len(config.aliases) == 5
    catch_all = {**B, "catch_all": True}  # takes any name, prefixed or not
    config_from_dict({"providers": [A, catch_all], "aliases": {"x": "nope/m"}}, {}, TYPES)
    config_from_dict({"aliases": {"x": "nope/m"}}, {}, TYPES)  # no provider: the demo


def test_duplicate_keys_at_any_depth_are_refused_with_their_path(tmp_path: Path) -> None:
    text = (
        "providers:\n"
        "  - {name: a, type: openai_compat, base_url: 'http://127.0.0.1:9/v1'}\n"
        "cache:\n"
        "  enabled: false\n"
        "  ttl: 5\n"
        "  ttl: 6\n"
        "providers:\n"
        "  - name: b\n"
        "    type: openai_compat\n"
        "    base_url: 'http://127.0.0.1:10/v1'\n"
        "    name: c\n"
        "aliases: {x: m, x: n}\n"
        "retries: {max_attempts: 0}\n"  # and the problems the loader found as before
    )
    problems = file_problems(tmp_path, text)
    assert problems[:4] == [
        "cache.ttl: duplicate key (lines 5 and 6); YAML would silently keep only the last",
        "providers: duplicate key (lines 1 and 7); YAML would silently keep only the last",
        "providers[0].name: duplicate key (lines 8 and 11); YAML would silently keep only "
        "the last",
        "aliases.x: duplicate key (lines 12 and 12); YAML would silently keep only the last",
    ], problems
    assert problems[4].startswith("retries.max_attempts: must be"), problems
    assert len(problems) == 5, problems


def test_anchors_and_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "providers:\n"
        "  - &p {name: a, type: openai_compat, base_url: 'http://127.0.0.1:9/v1'}\n"
        "  - {<<: *p, name: b}\n")
    config = load_config(Overrides(config_path=path), {}, TYPES)
    assert [p.name for p in config.providers] == ["a", "b"]


def test_duplicate_keys_in_the_keys_file_are_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"- name: k\n  sha256: {hash_secret('one')}\n  sha256: {hash_secret('two')}\n")
    problems = file_problems(tmp_path, f"auth: {{keys_file: {keys}}}\n")
    assert problems == [f"auth.keys_file ({keys})[0].sha256: duplicate key (lines 2 and 3); "
                        "YAML would silently keep only the last"]


def test_the_cli_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text("providers:\n"
                    "  - {name: a, type: openai_compat, base_url: 'http://127.0.0.1:9/v1'}\n"
                    "aliases: {fast: nope/model, x: x}\n"
                    "cache: {enabled: false}\n"
                    "cache: {enabled: true}\n")
    for command in ("serve", "check"):
        done = subprocess.run([sys.executable, "-m", "proxy", command, "--config", str(path)],
                              cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                              timeout=20, check=False)
        assert done.returncode == 2, done.stdout + done.stderr
        lines = done.stderr.splitlines()
        assert [line.split(":", 2)[1].strip() for line in lines] == [
            "cache", "aliases.fast", "aliases.x"], lines
        assert all(line.startswith("config error: ") for line in lines)
        assert done.stdout == ""
