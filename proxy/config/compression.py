"""The ``compression:`` section (issue 10): gzip for large answers the upstream sent
uncompressed (``compression.py`` does it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.config import validate as v


@dataclass(frozen=True, slots=True)
class CompressionConfig:
    """The ``compression:`` section: gzip answers over ``min_bytes`` at ``level``."""

    enabled: bool = True
    min_bytes: int = 1024
    level: int = 1

# For an answer to a request a peer worker forwarded (sharing/peers.py): the worker the client
# reached compresses it, after reading its usage (a gzip'ed body could not be read).
NEVER = CompressionConfig(enabled=False, min_bytes=1 << 62)


def _level(value: Any) -> int:
    number = v.positive_int(value)
    if number > 9:
        raise ValueError(f"must be a zlib level between 1 and 9 (got {value})")
    return number


def parse_compression(raw: Any, problems: list[str]) -> CompressionConfig:
    return v.section(raw, "compression", CompressionConfig, problems, {
        "enabled": v.boolean, "min_bytes": v.non_negative_int, "level": _level})
