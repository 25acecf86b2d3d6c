"""Gateway keys as the configuration holds them: a name, the sha256 of the secret, and
the models the key may use (issue #4).

The secret itself is never stored: ``proxy keys hash`` makes one and prints it once with
its hash, and only the hash goes into the config, so a leaked config file (or a log line
quoting it) gives no one a working key.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from proxy.config import validate as v

SECRET_PREFIX = "sk-gw-"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class GatewayKey:
    name: str
    sha256: str
    # Patterns (``*`` and ``?``, as in shell globs) matched against the model the client
    # names and its ``provider/model`` route; empty: every model.
    models: tuple[str, ...] = ()
    rpm: int | None = None  # requests per minute; None: unlimited (resilience/ratelimit.py)
    tpm: int | None = None  # tokens per minute, estimated then corrected from `usage`
    # May read the operator's pages (``/metrics``, ``/ui``, every key's ``/v1/usage``).
    admin: bool = False

    def allows(self, *model_names: str) -> bool:
        if not self.models:
            return True
        return any(fnmatchcase(name, pattern)
                   for name in model_names for pattern in self.models)


def new_secret() -> str:
    """A new random key: 256 bits, URL-safe, recognisable by its prefix."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_keys(raw: Any, problems: list[str], path: str = "auth.keys",
               known: tuple[GatewayKey, ...] = ()) -> tuple[GatewayKey, ...]:
    """A list of ``{name, sha256, models, rpm, tpm, admin}`` (``auth.keys``, or the list in
    ``auth.keys_file``, checked against the ``known`` ones); every problem reported."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(f"{path}: must be a list of keys")
        return ()
    keys: list[GatewayKey] = []
    for index, item in enumerate(raw):
        key = _parse_key(item, f"{path}[{index}]", problems)
        if key is None:
            continue
        if any(k.name == key.name for k in (*known, *keys)):
            problems.append(f"{path}[{index}].name: duplicate key name '{key.name}'")
        elif any(k.sha256 == key.sha256 for k in (*known, *keys)):
            problems.append(f"{path}[{index}].sha256: the same secret as another key")
        keys.append(key)
    return tuple(keys)


def read_keys_file(name: str, problems: list[str]) -> Any:
    """``auth.keys_file``: a YAML list of keys kept apart from the config (its own
    permissions, its own deployment); read again on every reload. None when unreadable."""
    try:
        text = Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(f"auth.keys_file: cannot read {name} ({exc.strerror})")
        return None
    try:
        keys, duplicates = v.load_yaml(text, f"auth.keys_file ({name})")
    except yaml.YAMLError as exc:
        problems.append(f"auth.keys_file: {name} is not valid YAML: {exc}")
        return None
    problems.extend(duplicates)
    return keys


def _parse_key(item: Any, path: str, problems: list[str]) -> GatewayKey | None:
    if not isinstance(item, dict):
        problems.append(f"{path}: must be a mapping with name and sha256")
        return None
    v.known_keys(item, path, ("name", "sha256", "models", "rpm", "tpm", "admin"), problems)
    before = len(problems)
    name = v.required(v.provider_name, item, "name", path, problems)
    digest = v.required(_sha256, item, "sha256", path, problems)
    models: list[str] = v.check(v.string_list, item, "models", path, [], problems)
    rpm = v.check(v.positive_int, item, "rpm", path, None, problems)
    tpm = v.check(v.positive_int, item, "tpm", path, None, problems)
    admin = v.check(v.boolean, item, "admin", path, False, problems)
    if len(problems) > before:
        return None
    return GatewayKey(name=name, sha256=digest, models=tuple(models), rpm=rpm, tpm=tpm,
                      admin=admin)


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not _SHA256.match(value.lower()):
        raise ValueError("must be the 64 hex digits of a sha256 (`proxy keys hash` prints "
                         "one)")
    return value.lower()
