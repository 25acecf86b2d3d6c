"""Small value validators for the config loader.

Each validator takes the raw YAML value and returns the typed value or raises
``ValueError`` with the rest of the sentence ("must be ..."); the helpers below prefix it
with the key path, so every problem reads ``providers[1].base_url: must start with ...``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
Validator = Callable[[Any], T]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_scalar(text: str) -> Any:
    """An environment value as YAML would read it (``8080`` -> int, ``2.5`` -> float)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def known_keys(raw: Mapping[str, Any], path: str, allowed: Collection[str],
               problems: list[str]) -> None:
    for key in raw:
        if key not in allowed:
            listed = ", ".join(sorted(allowed))
            problems.append(f"{join(path, str(key))}: unknown key (allowed: {listed})")


def check(validator: Validator[T], raw: Mapping[str, Any], key: str, path: str, default: T,
          problems: list[str]) -> T:
    """Validate ``raw[key]`` if present, else return ``default``."""
    if key not in raw:
        return default
    try:
        return validator(raw[key])
    except ValueError as exc:
        problems.append(f"{join(path, key)}: {exc}")
        return default


def required(validator: Validator[T], raw: Mapping[str, Any], key: str, path: str,
             problems: list[str]) -> Any:
    if key not in raw or raw[key] is None:
        problems.append(f"{join(path, key)}: is required")
        return None
    return check(validator, raw, key, path, None, problems)


def section(raw: Any, path: str, cls: Callable[..., T], problems: list[str],
            fields: Mapping[str, Validator[Any]]) -> T:
    """A mapping of scalar settings turned into the frozen dataclass ``cls``."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.append(f"{path}: must be a mapping")
        return cls()
    known_keys(raw, path, fields.keys(), problems)
    values = {}
    for key, validator in fields.items():
        if key in raw:
            before = len(problems)
            value = check(validator, raw, key, path, None, problems)
            if len(problems) == before:
                values[key] = value
    return cls(**values)


def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a number")
    return float(value)


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be an integer")
    return value


def positive_number(value: Any) -> float:
    number = _number(value)
    if number <= 0:
        raise ValueError(f"must be greater than 0 (got {value})")
    return number


def non_negative_number(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise ValueError(f"must not be negative (got {value})")
    return number


def positive_int(value: Any) -> int:
    number = _integer(value)
    if number <= 0:
        raise ValueError(f"must be greater than 0 (got {value})")
    return number


def non_negative_int(value: Any) -> int:
    number = _integer(value)
    if number < 0:
        raise ValueError(f"must not be negative (got {value})")
    return number


def port(value: Any) -> int:
    number = _integer(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"must be a port number between 0 and 65535 (got {value})")
    return number


def at_least(minimum: float) -> Validator[float]:
    def validator(value: Any) -> float:
        number = _number(value)
        if number < minimum:
            raise ValueError(f"must be at least {minimum:g} (got {value})")
        return number

    return validator


def fraction(value: Any) -> float:
    number = _number(value)
    if not 0 < number < 1:
        raise ValueError(f"must be between 0 and 1, exclusive (got {value})")
    return number


def one_of(*choices: str) -> Validator[str]:
    def validator(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of: {', '.join(choices)} (got {value!r})")
        return str(value)

    return validator


def url(value: Any) -> str:
    text = string(value)
    if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1]) == 0:
        raise ValueError("must start with http:// or https://")
    return text


def readable_file(value: Any) -> str:
    text = string(value)
    if not Path(text).is_file():
        raise ValueError(f"no such file: {text}")
    return text


def provider_name(value: Any) -> str:
    text = string(value)
    if "/" in text or not _NAME.match(text):
        raise ValueError(
            "must be letters, digits, '.', '_' or '-' (no '/': it prefixes model names)")
    return text


def env_name(value: Any) -> str:
    text = string(value)
    if not _ENV_NAME.match(text):
        raise ValueError("must be the name of an environment variable, not its value")
    return text


# Headers the gateway writes itself for each request's framing and hop: one configured
# beside them would send the upstream two (a second Host, a Content-Length of 0).
_FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection",
                              "keep-alive", "te", "trailer", "upgrade", "expect"})


def header_map(value: Any) -> dict[str, str]:
    """A provider's ``headers``: valid names, each once whatever its case (HTTP names
    are case-insensitive: both would go upstream), none the gateway frames itself, and
    values of one line of printable characters."""
    if not isinstance(value, dict):
        raise ValueError("must map header names to string values")
    seen: set[str] = set()
    for name, header_value in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise ValueError(f"'{name}' is not a valid header name")
        if name.lower() in _FRAMING_HEADERS:
            raise ValueError(f"'{name}' is set by the gateway itself and cannot be configured")
        if name.lower() in seen:
            raise ValueError(f"'{name}' is given twice (header names ignore case)")
        seen.add(name.lower())
        if not isinstance(header_value, str) or not header_value.replace("\t", " ").isprintable():
            raise ValueError(f"value of '{name}' must be a single-line string")
    return dict(value)


def file_mode(value: Any) -> int:
    """An octal string such as ``"0660"`` (a bare YAML 0660 would be read as decimal)."""
    digits = value.removeprefix("0") if isinstance(value, str) and len(value) == 4 else value
    if not isinstance(digits, str) or len(digits) != 3 or not set(digits) <= set("01234567"):
        raise ValueError('must be an octal string such as "0660"')
    return int(digits, 8)


def string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise ValueError("must be a list of non-empty strings")
    return list(value)


def load_yaml(text: str, path: str = "") -> tuple[Any, list[str]]:
    """The document in ``text`` and the keys given twice in one of its mappings, at any
    depth, with their key path: YAML keeps the last one silently, so a second
    ``providers:`` would drop the first list unseen. One parse serves both (the node
    tree, then the values built from it). Raises ``yaml.YAMLError`` for invalid YAML."""
    loader = yaml.SafeLoader(text)
    problems: list[str] = []
    try:
        node = loader.get_single_node()
        # Walked before the values are built: building flattens merge keys (``<<``) into
        # the node's own mapping, where they would read as duplicates.
        _duplicates_in(node, path, problems, set())
        document = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return document, problems


def _duplicates_in(node: yaml.Node | None, path: str, problems: list[str],
                   seen: set[int]) -> None:
    if node is None or id(node) in seen:  # an anchor used twice is walked once
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _duplicates_in(item, f"{path}[{index}]", problems, seen)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag.endswith(":merge"):
                continue
            key_path, line = join(path, key.value), key.start_mark.line + 1
            if (first := lines.get((key.tag, key.value))) is not None:
                problems.append(f"{key_path}: duplicate key (lines {first} and {line}); "
                                "YAML would silently keep only the last")
            lines.setdefault((key.tag, key.value), line)
            _duplicates_in(value, key_path, problems, seen)
