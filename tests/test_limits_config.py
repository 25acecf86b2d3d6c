"""The ``limits`` block after issue 9: the limit starts at ``max``, and the keys of the
removed latency gradient (``tolerance``, ``slack``) are refused with a clear reason."""

from __future__ import annotations

import pytest

from proxy.config.loader import ConfigError, config_from_dict
from proxy.config.sections import LimitsConfig
from proxy.providers import PROVIDER_TYPES


def load(limits: object) -> LimitsConfig:
    return config_from_dict({"limits": limits}, {}, PROVIDER_TYPES.keys()).limits


def test_the_limit_starts_at_max_by_default() -> None:
    limits = load(None)
    assert (limits.initial, limits.max) == (None, 1024)
    assert load({"max": 50}).max == 50


@pytest.mark.parametrize("key", ["tolerance", "slack"])
def test_retired_keys_are_refused_with_their_reason(key: str) -> None:
    with pytest.raises(ConfigError, match=f"limits.{key}: no longer exists: the limit "
                                          "no longer follows latency"):
        load({key: 1.5})


def test_backoff_must_be_a_fraction() -> None:
    with pytest.raises(ConfigError, match=r"limits\.backoff"):
        load({"backoff": 1.5})


def test_initial_must_lie_within_min_and_max() -> None:
    with pytest.raises(ConfigError, match=r"limits\.initial"):
        load({"initial": 2000})
    with pytest.raises(ConfigError, match=r"limits\.initial"):
        load({"min": 10, "max": 20, "initial": 5})


def test_forget_after_is_a_positive_number_of_seconds() -> None:
    assert load(None).forget_after == 10.0
    assert load({"forget_after": 2.5}).forget_after == 2.5
    with pytest.raises(ConfigError, match=r"limits\.forget_after"):
        load({"forget_after": 0})
