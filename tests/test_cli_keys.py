"""``proxy keys hash`` and ``proxy check`` refuse what cannot work (issue 9, part 3): a
blank ``--secret`` must not hash a random secret nobody sees, a ``--name`` the config
would refuse must not make a snippet the loader then rejects, and ``check`` with no
provider configured must not report the bundled demo mock as healthy. The real CLI runs
in a subprocess, bounded by a timeout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config.keys import hash_secret
from proxy.config.loader import Overrides, load_config
from proxy.providers import PROVIDER_TYPES
from tests.procs import clean_env

NAME_RULE = "must be letters, digits, '.', '_' or '-'"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m proxy ARGS`` without the caller's provider settings, at most 20 s."""
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=20, check=False)


@pytest.mark.parametrize("secret", ["", "   ", "\t"])
def test_a_blank_secret_is_refused_not_replaced_by_a_random_one(secret: str) -> None:
    done = cli("keys", "hash", "--secret", secret)
    assert done.returncode == 2, done.stdout
    assert done.stdout == ""  # no hash of a secret the operator never saw
    assert done.stderr.splitlines() == [
        "usage error: --secret is empty; leave it out to make a new random key"]


def test_a_secret_with_surrounding_whitespace_is_refused() -> None:
    done = cli("keys", "hash", "--secret", " sk-gw-padded ")
    assert done.returncode == 2, done.stdout
    assert "whitespace" in done.stderr and done.stdout == ""


@pytest.mark.parametrize("name", ["team/a", "", "-leading-dash", "has space"])
def test_a_name_the_config_would_refuse_is_refused_with_the_loaders_message(
    name: str, tmp_path: Path,
) -> None:
    done = cli("keys", "hash", f"--name={name}", "--secret", "sk-gw-fine")
    assert done.returncode == 2, done.stdout
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    # What the loader says of the same entry in a file:
    digest = hash_secret("sk-gw-fine")
    config = tmp_path / "proxy.yaml"
    config.write_text(f"auth:\n  keys:\n    - {{name: '{name}', sha256: {digest}}}\n")
    loaded = cli("check", "--config", str(config))
    assert loaded.returncode == 2
    loader_says = loaded.stderr.strip().removeprefix("config error: ")
    assert line.endswith(loader_says), (line, loader_says)
    assert line.startswith(f"usage error: --name {name!r}")


def test_a_good_name_and_secret_still_print_the_entry() -> None:
    done = cli("keys", "hash", "--name", "team-a.v2_x", "--secret", "sk-gw-fine")
    assert done.returncode == 0, done.stderr
    assert f"sha256: {hash_secret('sk-gw-fine')}" in done.stdout
    assert "- name: team-a.v2_x" in done.stdout
    assert "secret:" not in done.stdout  # a given secret is not echoed
    made = cli("keys", "hash")
    assert made.returncode == 0 and made.stdout.startswith("secret: sk-gw-")
    assert "admin" not in made.stdout


def test_an_admin_keys_entry_loads_as_an_admin_key(tmp_path: Path) -> None:
    """``--admin`` prints the entry with ``admin: true``, and that entry, pasted into a
    config file as printed, loads as an admin key."""
    done = cli("keys", "hash", "--name", "prometheus", "--admin", "--secret", "sk-gw-adm")
    assert done.returncode == 0, done.stderr
    snippet = done.stdout.split("config:\n", 1)[1]
    config = tmp_path / "proxy.yaml"
    config.write_text(snippet)
    (key,) = load_config(Overrides(config_path=config), {}, PROVIDER_TYPES.keys()).auth.keys
    assert (key.name, key.admin) == ("prometheus", True)
    assert key.sha256 == hash_secret("sk-gw-adm")


def test_check_with_no_provider_fails_instead_of_checking_the_demo(tmp_path: Path) -> None:
    done = cli("check", cwd=tmp_path)  # no ./proxy.yaml, no provider variables
    assert done.returncode == 1, done.stdout + done.stderr
    assert "mock" not in done.stdout and "ok" not in done.stdout
    assert "no providers configured" in done.stderr
    config = tmp_path / "proxy.yaml"
    config.write_text("cache: {enabled: false}\n")  # a file that names no provider
    done = cli("check", cwd=tmp_path)
    assert done.returncode == 1 and "no providers configured" in done.stderr
