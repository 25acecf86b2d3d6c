"""Shared fixtures: real servers on loopback, nothing mocked but the internet.

* ``start_upstream(app)`` serves a tiny aiohttp app defined in the test itself;
* ``mock_upstream`` serves the scriptable mock from ``proxy/mock/server.py``;
* ``make_config(providers, **raw)`` validates a config exactly as the YAML loader does,
  with upstream retries off unless ``retries`` is given: the tests of everything else
  count upstream calls exactly (tests/test_retries.py covers retries);
* ``start_gateway(config)`` runs the real gateway with the production runner settings
  (``proxy.server.serve.running``) on a free port and returns its base URL;
* ``openai_client(url)`` is the official async SDK pointed at a gateway;
* ``raw_upstream(script)`` starts a raw upstream (``tests/wire.py``) the test scripts
  byte by byte; ``closed_port`` is a loopback port nobody listens on;
* ``cacheless_gateway(providers, **raw)`` is ``start_gateway`` with the cache off, so
  every request that is not deduplicated reaches the upstream;
* ``redis_server`` is a real redis-server on a free port (``tests/redis_server.py``);
* ``start_fake(**reply)`` / ``fake_upstream``: the one counting fake upstream
  (``tests/fake_upstream.py``), scriptable per path, on a free port;
* ``live_gateway(*upstreams, **raw)``: the real app in front of fake upstreams, returned
  with its state (``tests/running.py``) so a test polls it instead of sleeping;
* ``socket_dir`` (short, for unix sockets), ``unanswered_port`` (connects hang),
  ``connect`` and ``safe_gateway`` (raw HTTP, ``tests/raw_http.py``).

Helpers live in helper modules named by what they hold (procs.py, cli_helpers.py,
nginx_helpers.py, assertions.py, polling.py, ...); no test file imports another.
"""

from __future__ import annotations

import dataclasses
import select
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.app import build_app
from proxy.config.loader import Config, config_from_dict
from proxy.mock.server import OPTIONS_KEY, STATS_KEY, MockOptions, MockStats, create_app
from proxy.providers import PROVIDER_TYPES
from proxy.server.serve import running
from tests.fake_upstream import FakeUpstream
from tests.running import RunningGateway

if TYPE_CHECKING:
    from tests.raw_http import Connect, Safe
    from tests.redis_server import RedisServer
    from tests.wire import StartRaw

# The helper modules' asserts get pytest's detailed messages, as they had in the test
# files they came from (issue 11); registered before any test module imports them.
pytest.register_assert_rewrite(
    "tests.assertions", "tests.bench_runs", "tests.cli_helpers", "tests.faulty",
    "tests.load_client", "tests.nginx_helpers", "tests.procs", "tests.raw_http",
    "tests.usage_fake", "tests.usage_helpers", "tests.wire")

StartUpstream = Callable[[web.Application], Awaitable[str]]
StartGateway = Callable[[Config], Awaitable[str]]
MakeConfig = Callable[..., Config]
StartFake = Callable[..., Awaitable[FakeUpstream]]
StartLive = Callable[..., Awaitable[RunningGateway]]


@dataclasses.dataclass
class MockUpstream:
    url: str  # base URL including /v1, as a provider's base_url
    app: web.Application

    @property
    def stats(self) -> MockStats:
        return self.app[STATS_KEY]

    @property
    def options(self) -> MockOptions:
        return self.app[OPTIONS_KEY]


@pytest.fixture
async def start_upstream() -> AsyncIterator[StartUpstream]:
    async with AsyncExitStack() as stack:
        async def start(app: web.Application) -> str:
            server = TestServer(app, host="127.0.0.1", port=0)
            await stack.enter_async_context(server)
            return str(server.make_url("")).rstrip("/")

        yield start


@pytest.fixture
async def mock_upstream(start_upstream: StartUpstream) -> MockUpstream:
    app = create_app(MockOptions())
    url = await start_upstream(app)
    return MockUpstream(url=f"{url}/v1", app=app)


@pytest.fixture
def start_fake(start_upstream: StartUpstream) -> StartFake:
    """``await start_fake(models=("m",), **chat_reply)`` -> a new counting fake upstream
    (``tests/fake_upstream.py``) on a free loopback port, its ``url`` set (with /v1)."""
    async def start(models: tuple[str, ...] = ("m",), **chat: Any) -> FakeUpstream:
        fake = FakeUpstream(models, **chat)
        fake.url = f"{await start_upstream(fake.app())}/v1"
        return fake

    return start


@pytest.fixture
async def fake_upstream(start_fake: StartFake) -> FakeUpstream:
    """One counting fake upstream with the default script (``tests/fake_upstream.py``)."""
    return await start_fake()


@pytest.fixture
def make_config() -> MakeConfig:
    def build(providers: list[dict[str, Any]], env: dict[str, str] | None = None,
              **raw: Any) -> Config:
        raw.setdefault("retries", {"max_attempts": 1})
        return config_from_dict({"providers": providers, **raw}, env or {},
                                PROVIDER_TYPES.keys())

    return build


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    async with AsyncExitStack() as stack:
        async def start(config: Config) -> str:
            server = dataclasses.replace(config.server, host="127.0.0.1", port=0)
            return await stack.enter_async_context(
                running(dataclasses.replace(config, server=server)))

        yield start


@pytest.fixture
async def live_gateway(fake_upstream: FakeUpstream, start_upstream: StartUpstream,
                       make_config: MakeConfig) -> AsyncIterator[StartLive]:
    """``await live_gateway(*upstreams, **raw_config)`` -> a ``RunningGateway``
    (``tests/running.py``): the real app (``build_app``, ``running``) in front of
    ``upstreams`` (fake upstreams, started here if they are not yet, or provider
    entries; default: ``fake_upstream``), with its URL and its state to poll."""
    async with AsyncExitStack() as stack:
        async def start(*upstreams: FakeUpstream | dict[str, Any], **raw: Any
                        ) -> RunningGateway:
            fakes = [u for u in upstreams if isinstance(u, FakeUpstream)] or [fake_upstream]
            for fake in fakes:
                if not fake.url:
                    fake.url = f"{await start_upstream(fake.app())}/v1"
            entries = [u.provider() if isinstance(u, FakeUpstream) else u
                       for u in upstreams or [fake_upstream]]
            config = make_config(entries, **raw)
            config = dataclasses.replace(config, server=dataclasses.replace(
                config.server, host="127.0.0.1", port=0))
            app = build_app(config)
            url = await stack.enter_async_context(running(config, app=app))
            return RunningGateway(url, app, fakes[0])

        yield start


@pytest.fixture
async def openai_client() -> AsyncIterator[Callable[..., openai.AsyncOpenAI]]:
    async with AsyncExitStack() as stack:
        def make(gateway_url: str, **kwargs: Any) -> openai.AsyncOpenAI:
            kwargs.setdefault("api_key", "sk-client-test")
            kwargs.setdefault("max_retries", 0)
            kwargs.setdefault("timeout", 10)
            client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", **kwargs)
            stack.push_async_callback(client.close)
            return client

        yield make


@pytest.fixture
async def raw_upstream() -> AsyncIterator[StartRaw]:
    """Asked for before ``start_gateway`` so the gateway stops first."""
    from tests.wire import raw_servers  # noqa: PLC0415 - wire.py imports this module

    async with raw_servers() as start:
        yield start


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port bound but never listening: connections to it are refused, and
    nothing else can take it while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A loopback port whose listen backlog is full, so a new connection's SYN is
    dropped and ``connect`` hangs (Linux: the accept queue holds backlog + 1)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
            if not select.select([], [filler], [], 0.2)[1]:
                yield listener.getsockname()[1]
                return
        pytest.skip("this kernel completes connections beyond the listen backlog")
    finally:
        for sock in (*fillers, listener):
            sock.close()


@pytest.fixture
def cacheless_gateway(start_gateway: StartGateway, make_config: MakeConfig
                      ) -> Callable[..., Awaitable[str]]:
    """``await cacheless_gateway(providers, **raw_config)`` -> base URL."""
    async def start(providers: list[dict[str, Any]], **raw: Any) -> str:
        raw.setdefault("cache", {"enabled": False})
        return await start_gateway(make_config(providers, **raw))

    return start


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port (``tests/redis_server.py``), killed by
    PID at the end. Skips only when redis-server is not installed (.ci/run installs it)."""
    from tests.redis_server import RedisServer, find_redis_server  # noqa: PLC0415

    binary = find_redis_server()
    if binary is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    server = RedisServer(binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to ~107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="proxy-sock-") as path:
        yield Path(path)


@pytest.fixture
def safe_gateway(start_upstream: StartUpstream, start_gateway: StartGateway,
                 make_config: MakeConfig) -> Safe:
    """``await safe_gateway(delay, **server_keys)`` -> (gateway URL, the upstream's
    recorder, ``tests/raw_http.py``), with the cache off so every request that gets
    through reaches the upstream."""
    from tests.raw_http import Recorder, recording_upstream  # noqa: PLC0415 - imports this module
    from tests.wire import gateway  # noqa: PLC0415

    async def start(delay: float = 0.0, **server: Any) -> tuple[str, Recorder]:
        recorder = Recorder(delay=delay)
        upstream = await start_upstream(recording_upstream(recorder))
        url = await gateway(start_gateway, make_config, f"{upstream}/v1", server=server,
                            cache={"enabled": False})
        return url, recorder

    return start


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """``await connect(url)`` -> a raw client connection (``tests/raw_http.py``), closed
    after the test."""
    from tests.raw_http import Raw  # noqa: PLC0415 - raw_http.py imports this module

    clients: list[Raw] = []

    async def open_one(url: str) -> Raw:
        clients.append(await Raw.open(url))
        return clients[-1]

    yield open_one
    for client in clients:
        await client.close()
