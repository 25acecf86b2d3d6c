"""What answers are checked against, shared by several test files: OpenAI's error shape
(``assert_error``) and the samples of a Prometheus exposition (``parse``, ``value``),
so a test compares exact figures instead of searching the text."""

from __future__ import annotations

import orjson
from prometheus_client.parser import text_string_to_metric_families


def assert_error(body: bytes, code: str, type_: str = "invalid_request_error",
                 param: str | None = None) -> str:
    """``body`` is exactly OpenAI's error shape; returns the message."""
    parsed = orjson.loads(body)
    assert list(parsed) == ["error"]
    error = parsed["error"]
    assert sorted(error) == ["code", "message", "param", "type"]
    assert (error["type"], error["code"], error["param"]) == (type_, code, param)
    assert isinstance(error["message"], str)
    assert error["message"]
    return str(error["message"])


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a ``/metrics`` text by (name, labels)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a counter never incremented is not exposed)."""
    return samples.get((name, frozenset(labels.items())), 0.0)
