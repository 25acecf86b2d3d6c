"""Secrets stay secret in the gateway as a real process (issue #4): neither the upstream
key (``api_key_env``) nor a gateway key (``auth.keys``) appears in the process's own
output at ``--log-level DEBUG`` (every logger, as configured by the CLI, start-up and
shutdown included), in any answer (headers and bodies of 200, 401, 403, 404, 429, 502,
503, 504, an SSE error event, the models listing) or in ``/health``.

tests/test_errors.py and tests/test_auth.py check the same in-process, through
``caplog``, for fewer answers; this adds the process's real stderr and the 429, 503,
SSE-error and key-looking-like-the-upstream-key cases. There is no metrics endpoint.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.config.keys import hash_secret
from tests.conftest import StartUpstream
from tests.faulty import CHAT, Faults, chat, providers
from tests.procs import Proc, gateway_process, stop

UPSTREAM_KEY = "sk-upstream-Zq8vN3xW5pLr7Tb2Kc"
LIMITED_KEY = "sk-gw-limited-Hy4mQ9sD1fGj6Ve0"
FULL_KEY = "sk-gw-full-Rw2nB8kX3tMz5Ua7"
SECRETS = (UPSTREAM_KEY, LIMITED_KEY, FULL_KEY)
KEYS = [{"name": "limited", "sha256": hash_secret(LIMITED_KEY), "models": ["ok-m"],
         "rpm": 2},
        {"name": "full", "sha256": hash_secret(FULL_KEY)}]
# (key presented, method, path, body or None, expected status)
CALLS = [
    (None, "POST", CHAT, chat("ok-m"), 401),
    (FULL_KEY + "x", "POST", CHAT, chat("ok-m"), 401),
    (UPSTREAM_KEY, "POST", CHAT, chat("ok-m"), 401),  # a client sending the upstream's key
    (LIMITED_KEY, "POST", CHAT, chat("hang-m"), 403),
    (LIMITED_KEY, "POST", CHAT, chat("ok-m"), 200),
    (LIMITED_KEY, "POST", CHAT, chat("ok-m"), 200),
    (LIMITED_KEY, "POST", CHAT, chat("ok-m"), 429),  # rpm 2
    (FULL_KEY, "POST", CHAT, chat("dead-m"), 502),
    (FULL_KEY, "POST", CHAT, chat("dead-m"), 503),  # the breaker opened
    (FULL_KEY, "POST", CHAT, chat("hang-m"), 504),
    (FULL_KEY, "POST", CHAT, chat("drop-m", stream=True), 200),  # ends with an error event
    (FULL_KEY, "POST", CHAT, chat("ok-m", stream=True), 200),
    (FULL_KEY, "POST", CHAT, chat("no-such-model"), 404),
    (FULL_KEY, "GET", "/v1/models", None, 200),
    (FULL_KEY, "GET", "/v1/models/ok-m", None, 200),
    (None, "GET", "/health", None, 503),  # dead's breaker is open: unhealthy
    (None, "GET", "/healthz", None, 200),
]


@pytest.fixture
def faults() -> Faults:
    return Faults()


@pytest.fixture
async def gateway(start_upstream: StartUpstream, closed_port: int, tmp_path: Path,
                  faults: Faults) -> AsyncIterator[Proc]:
    upstream = await start_upstream(faults.app())
    config = {"providers": providers(upstream, closed_port, api_key_env="UP_KEY"),
              "auth": {"keys": KEYS}, "timeouts": {"read": 0.5},
              "retries": {"max_attempts": 1}, "breaker": {"min_requests": 1, "min_callers": 1,
                                                    "cooldown": 60, "fail_fast": True}}
    async with gateway_process(tmp_path, config, env={"UP_KEY": UPSTREAM_KEY},
                               log_level="DEBUG") as proc:
        yield proc


async def answers(gateway: Proc) -> list[tuple[int, str]]:
    """Every call's status and its whole answer (status line, headers, body) as text."""
    seen: list[tuple[int, str]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for key, method, path, body, _ in CALLS:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            async with session.request(method, gateway.url + path, json=body,
                                       headers=headers) as response:
                text = await response.text()
                seen.append((response.status, f"{response.status} {response.reason}\n"
                             f"{dict(response.headers)}\n{text}"))
    return seen


def leaked(text: str) -> list[str]:
    """The secrets found in ``text``, whole or as a 12-character slice of their random
    tail (a log line quoting a prefix of a key, or one cut short)."""
    return [s for s in SECRETS if s in text or s[-12:] in text or s[-20:-8] in text]


async def test_no_secret_in_process_output_answers_or_health(
        gateway: Proc, faults: Faults) -> None:
    seen = await answers(gateway)
    assert [status for status, _ in seen] == [call[-1] for call in CALLS], seen
    assert "event: error" in seen[10][1]
    await gateway_stopped(gateway)
    output = gateway.spawned.log.read_text(errors="replace")
    # The secrets were in play: the upstream got its key, and the process did log (at
    # DEBUG level; today its own lines are INFO and up).
    assert set(faults.authorizations) == {f"Bearer {UPSTREAM_KEY}"}
    assert '"level":"INFO"' in output and '"level":"WARNING"' in output, output  # JSON
    for status, text in seen:
        assert not leaked(text), f"{status} answer:\n{text}"
    assert not leaked(output), output


async def gateway_stopped(gateway: Proc) -> None:
    """SIGTERM, so the output is complete (shutdown logging included)."""
    assert await stop(gateway.spawned) == 0, gateway.output()
