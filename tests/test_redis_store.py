"""The Redis backend's parts against a real redis-server (issue #4): the token-bucket
script (atomic, TTL, reloaded after SCRIPT FLUSH, debts), the cache framing, the config
section and its checks, and that nothing imports ``redis`` unless a backend uses it."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.config.loader import ConfigError, Overrides, load_config
from proxy.config.redis import RedisSettings, redact
from proxy.providers import PROVIDER_TYPES
from proxy.resilience.ratelimit import BackendUnavailable
from proxy.stores.redis_buckets import RedisBuckets
from proxy.stores.redis_cache import decode, encode
from proxy.stores.redis_link import RedisLink
from tests.conftest import MakeConfig
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def link(redis_server: RedisServer) -> AsyncIterator[RedisLink]:
    link = RedisLink(RedisSettings(url=redis_server.url, key_prefix="t:"), "test")
    yield link
    await link.close()


async def test_concurrent_takes_never_exceed_the_limit(link: RedisLink) -> None:
    buckets = RedisBuckets(link)
    results = await asyncio.gather(*(buckets.take([("k:rpm", 10, 1)]) for _ in range(40)))
    assert sum(refused is None for refused, _ in results) == 10
    ttl = await link.client.pttl("t:ratelimit:k:rpm")
    assert 1000 < ttl <= 61_000  # expires once it would be full again (10 per minute)


async def test_all_or_nothing_debts_and_the_script_reloaded(link: RedisLink) -> None:
    buckets = RedisBuckets(link)
    refused, states = await buckets.take([("a:rpm", 5, 1), ("a:tpm", 100, 101)])
    assert refused == 1 and [round(s.remaining) for s in states] == [5, 100]
    assert await link.client.exists("t:ratelimit:a:rpm") == 0  # nothing taken
    refused, states = await buckets.take([("a:rpm", 5, 1), ("a:tpm", 100, 100)])
    assert refused is None and [round(s.remaining) for s in states] == [4, 0]
    await link.client.script_flush()  # as after a Redis restart: EVALSHA falls back
    await buckets.give("a:tpm", 100, -50)  # used 50 more than taken: a debt
    refused, [state] = await buckets.take([("a:tpm", 100, 1)])
    assert refused == 0 and -51 < state.remaining < -49
    assert state.reset > 60  # a debt takes longer than a minute to refill
    await buckets.give("a:tpm", 100, 1000)  # never above the limit
    assert round((await buckets.take([("a:tpm", 100, 0)]))[1][0].remaining) == 100


async def test_a_script_call_that_timed_out_is_never_sent_again(
    redis_server: RedisServer,
) -> None:
    """A take whose reply comes after ``timeout`` has run in Redis all the same: sent
    again, it would charge twice (a spurious 429; a give, a refund twice)."""
    link = RedisLink(RedisSettings(url=redis_server.url, timeout=1, key_prefix="t:"), "t")
    buckets = RedisBuckets(link)
    try:
        await buckets.take([("k:tpm", 6, 2)])  # the script loaded: 4 left
        _, blocker = await asyncio.open_connection("127.0.0.1", redis_server.port)
        blocker.write(b"DEBUG SLEEP 1.6\r\n")  # Redis busy past the take's timeout
        await asyncio.sleep(0.2)
        with contextlib.suppress(BackendUnavailable):  # raised once fixed
            await buckets.take([("k:tpm", 6, 2)])
        blocker.close()
        await asyncio.sleep(2)  # Redis awake, and any resent take run
        tokens = float(await link.client.hget("t:ratelimit:k:tpm", "tokens") or 0)
    finally:
        await link.close()
    assert 1.5 < tokens < 3.5, tokens  # charged once: 4 - 2 (plus 0.1 a second refilled)


async def test_a_connection_redis_closed_is_replaced_before_sending(
    link: RedisLink, redis_server: RedisServer,
) -> None:
    """No retry is needed for an idle connection Redis closed (a restart, its ``timeout``):
    the pool checks it before sending and reconnects."""
    buckets = RedisBuckets(link)
    await buckets.take([("k:rpm", 3, 1)])
    reader, killer = await asyncio.open_connection("127.0.0.1", redis_server.port)
    killer.write(b"CLIENT KILL TYPE normal\r\n")  # all but itself: the pooled one
    assert await reader.readline() == b":1\r\n"
    killer.close()
    await asyncio.sleep(0.1)  # its FIN arrived
    assert (await buckets.take([("k:rpm", 3, 1)]))[0] is None
    assert link.up


async def test_an_unreachable_redis_is_backend_unavailable_logged_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    redis_server.password = "s3cret-pass"  # the next start requires it
    redis_server.kill()
    redis_server.start()
    settings = RedisSettings(url=redis_server.url, timeout=1, retry_interval=0.05)
    link = RedisLink(settings, "the test falls back")
    buckets = RedisBuckets(link)
    try:
        assert (await buckets.take([("k:rpm", 3, 1)]))[0] is None
        redis_server.kill()
        for _ in range(3):
            with pytest.raises(BackendUnavailable):
                await buckets.take([("k:rpm", 3, 1)])
            await asyncio.sleep(0.06)
        assert not link.up
        redis_server.start()
        await asyncio.sleep(0.06)
        assert (await buckets.take([("k:rpm", 3, 1)]))[0] is None
        assert link.up
    finally:
        await link.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "proxy.redis"]
    assert len([m for m in messages if "unreachable (" in m]) == 1, messages
    assert len([m for m in messages if "reachable again" in m]) == 1, messages
    assert "the test falls back" in messages[0]
    assert "redis://:***@127.0.0.1" in messages[0]
    assert not [m for m in messages if "s3cret-pass" in m]


async def test_a_long_outage_is_logged_once_a_minute(
    closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    settings = RedisSettings(url=f"redis://127.0.0.1:{closed_port}", retry_interval=1)
    link = RedisLink(settings, "test", clock=lambda: now[0])
    buckets = RedisBuckets(link)
    try:
        for at in (0, 0.5, 2, 30, 61, 62):
            now[0] = at
            with pytest.raises(BackendUnavailable):
                await buckets.take([("k:rpm", 3, 1)])
    finally:
        await link.close()
    messages = [r.getMessage() for r in caplog.records if r.name == "proxy.redis"]
    assert len(messages) == 2, messages
    assert "is unreachable (ConnectionError" in messages[0]
    # 0.5 s was within retry_interval: Redis was not asked, the call fell back at once.
    assert "still unreachable after 61 s (5 calls fell back)" in messages[1]


def test_redact_hides_passwords_only() -> None:
    assert redact("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact("rediss://user:pw@h/1") == "rediss://user:***@h/1"
    assert redact("unix:///run/r.sock?db=1&password=pw") == "unix:///run/r.sock?db=1&password=***"
    assert redact("redis://h:6379") == "redis://h:6379"
    assert "pw" not in repr(RedisSettings(url="redis://:pw@h"))


def test_the_cache_frame_round_trips_and_rejects_others() -> None:
    frame = encode(200, "OK", (("Content-Type", "text/event-stream"),), b"data: \x00\xff\n\n")
    answer = decode(frame)
    assert answer is not None
    assert (answer.status, answer.reason, dict(answer.headers)) == (
        200, "OK", {"Content-Type": "text/event-stream"})
    assert decode(b"\x02" + frame[1:]) is None  # another version
    assert decode(frame[:7]) is None
    assert decode(b"\x01\x00\x00\x00\x02[]") is None  # JSON, not its shape


def test_config_section_and_its_problems(make_config: MakeConfig) -> None:
    config = make_config([], redis={"url": "redis://:pw@127.0.0.1:6379/2", "timeout": 0.2,
                                    "failure_policy": "fail_closed"},
                         auth={"limits_backend": "redis"}, cache={"backend": "redis"})
    assert (config.redis.timeout, config.redis.failure_policy) == (0.2, "fail_closed")
    assert (config.auth.limits_backend, config.cache.backend) == ("redis", "redis")
    with pytest.raises(ConfigError) as error:
        make_config([], auth={"limits_backend": "redis"}, cache={"backend": "disk"},
                    redis={"url": "http://:pw@h", "failure_policy": "maybe", "colour": 1})
    assert error.value.problems == [
        "cache.backend: must be one of: memory, redis (got 'disk')",
        "redis.colour: unknown key (allowed: connect_timeout, failure_policy, key_prefix, "
        "retry_interval, timeout, url)",
        "redis.url: must start with redis://, rediss:// or unix://",
        "redis.failure_policy: must be one of: fail_open, fail_closed (got 'maybe')",
        "redis.url: is required when auth.limits_backend is redis",
    ]
    assert "pw" not in "".join(error.value.problems)
    with pytest.raises(ConfigError) as error:
        make_config([], cache={"backend": "redis"}, redis={"url": "redis://h:port"})
    assert error.value.problems == ["redis.url: is not a valid URL (its port?)",
                                    "redis.url: is required when cache.backend is redis"]
    assert make_config([], cache={"backend": "redis", "enabled": False}).redis.url is None
    from_env = load_config(Overrides(), {"PROXY_REDIS_URL": "redis://:pw@h:1/0"},
                           PROVIDER_TYPES.keys())
    assert from_env.redis.safe_url == "redis://:***@h:1/0"


def test_without_a_redis_backend_redis_is_never_imported(tmp_path: Path) -> None:
    """The extra is optional: with ``redis`` made unimportable, a memory-backed gateway
    builds, and choosing a Redis backend is a config problem, not a crash."""
    script = """
import sys
sys.modules["redis"] = None  # any import of it now fails
from proxy.app import build_app
from proxy.config.loader import ConfigError, config_from_dict
build_app(config_from_dict({}, {}, ()))
try:
    config_from_dict({"cache": {"backend": "redis"}, "redis": {"url": "redis://h"}}, {}, ())
except ConfigError as error:
    print(error.problems)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "cache.backend: redis needs the redis package" in result.stdout
