"""Gateway keys with ``--workers 2``: real supervisor and workers, keys in a YAML file.

Issue 9, part 3: "``--workers 2`` with ``auth.keys``: about 40 % of deterministic requests
get ``401 invalid_api_key``": a shareable request is forwarded to the worker owning its
key (``peers.py``) without the client's ``Authorization``. Every request here is sent
through each worker's own unix socket, so each is forwarded by exactly one of them
whichever worker owns its key: nothing depends on how the kernel spreads connections.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import yaml

from proxy.config.keys import hash_secret
from proxy.config.worker import WorkerSpec
from proxy.server.supervisor import PEER_SECRET_ENV
from tests.conftest import StartFake
from tests.fake_upstream import CHAT, EMBEDDINGS, FakeUpstream
from tests.procs import Spawned, free_port, spawn, stop, unix_healthz, wait_for_sockets

SECRETS = {"team-a": "sk-gw-team-a-0123456789", "team-b": "sk-gw-team-b-0123456789",
           "only-other": "sk-gw-only-other-012345", "limited": "sk-gw-limited-0123456789"}
KEYS = [{"name": "team-a", "sha256": hash_secret(SECRETS["team-a"])},
        {"name": "team-b", "sha256": hash_secret(SECRETS["team-b"])},
        {"name": "only-other", "sha256": hash_secret(SECRETS["only-other"]),
         "models": ["other"]},
        {"name": "limited", "sha256": hash_secret(SECRETS["limited"]), "rpm": 12}]
PEER_HEADERS = ("x-gateway-peer", "x-gateway-peer-key")


def answered(fake: FakeUpstream) -> int:
    """The chat and embeddings calls ``fake`` answered (each numbered: two calls never
    have equal bodies)."""
    return fake.calls[CHAT] + fake.calls[EMBEDDINGS]


@dataclass
class Gateway:
    proxy: Spawned
    port: int
    sockets: tuple[Path, ...]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def keyed_workers(upstream: str, tmp_path: Path, socket_dir: Path
                        ) -> AsyncIterator[Gateway]:
    config = {"providers": [{"name": "u", "type": "openai_compat", "base_url": upstream}],
              "auth": {"keys": KEYS}, "cache": {"enabled": True}}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    proxy = spawn("proxy", [sys.executable, "-m", "proxy", "serve", "--config", str(path),
                            "--workers", "2", "--socket-dir", str(socket_dir),
                            "--port", str(port)], tmp_path)
    sockets = WorkerSpec(0, 2, socket_dir).peers
    try:
        await wait_for_sockets(list(sockets), [proxy])
        yield Gateway(proxy, port, sockets)
    finally:
        await stop(proxy)
        print(proxy.output())


async def post(socket: Path, body: dict[str, Any], headers: dict[str, str],
               endpoint: str = "chat/completions") -> tuple[int, dict[str, Any], str]:
    """One request through one worker's unix socket: status, JSON body, remaining rpm."""
    connector = aiohttp.UnixConnector(path=str(socket))
    async with (aiohttp.ClientSession(connector=connector,
                                      timeout=aiohttp.ClientTimeout(total=10)) as session,
                session.post(f"http://gateway/v1/{endpoint}", data=orjson.dumps(body),
                             headers={"Content-Type": "application/json", **headers}) as r):
        return (r.status, orjson.loads(await r.read()),
                r.headers.get("x-ratelimit-remaining-requests", ""))


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


def chat(prompt: str, temperature: float = 0) -> dict[str, Any]:
    return {"model": "m", "temperature": temperature,
            "messages": [{"role": "user", "content": prompt}]}


async def test_every_deterministic_request_with_a_valid_key_succeeds(
    start_fake: StartFake, tmp_path: Path, socket_dir: Path
) -> None:
    upstream = await start_fake(pieces=("answer",))
    url = upstream.url.removesuffix("/v1")
    async with keyed_workers(f"{url}/v1", tmp_path, socket_dir) as gateway:
        statuses = [(await post(socket, chat(f"question {i}"), bearer("team-a")))[0]
                    for i in range(12) for socket in gateway.sockets]
        statuses += [(await post(socket, {"model": "m", "input": f"text {i}"},
                                 bearer("team-a"), "embeddings"))[0]
                     for i in range(6) for socket in gateway.sockets]
        assert statuses == [200] * 36, gateway.proxy.output()
        # The SDK over the shared TCP port: whichever worker its connection reached.
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", max_retries=0,
                                      api_key=SECRETS["team-b"], timeout=10) as client:
            for i in range(10):
                answer = await client.chat.completions.create(
                    model="m", temperature=0, seed=i,
                    messages=[{"role": "user", "content": f"sdk {i}"}])
                assert (answer.choices[0].message.content or "").startswith("answer")
    for headers in upstream.headers(None):  # the hop to the owner leaves nothing upstream
        assert "authorization" not in headers
        assert not [name for name in PEER_HEADERS if name in headers], headers


async def test_two_keys_never_share_an_answer_across_workers(
    start_fake: StartFake, tmp_path: Path, socket_dir: Path
) -> None:
    upstream = await start_fake(pieces=("answer",))
    url = upstream.url.removesuffix("/v1")
    async with keyed_workers(f"{url}/v1", tmp_path, socket_dir) as gateway:
        for i in range(4):
            answers: dict[str, list[str]] = {"team-a": [], "team-b": []}
            for name, socket in [(n, s) for n in answers for s in gateway.sockets]:
                status, body, _ = await post(socket, chat(f"same {i}"), bearer(name))
                assert status == 200, body
                answers[name].append(body["id"])
            a, b = answers["team-a"], answers["team-b"]
            # One key's two requests share one call (the cache of the owner); the other
            # key's never get that answer, forwarded or not.
            assert a[0] == a[1] and b[0] == b[1] and a[0] != b[0], answers
    assert answered(upstream) == 8


async def test_a_forged_peer_header_gains_nothing(
    start_fake: StartFake, tmp_path: Path, socket_dir: Path
) -> None:
    upstream = await start_fake(pieces=("answer",))
    url = upstream.url.removesuffix("/v1")
    forged = [{"X-Gateway-Peer": "1", "X-Gateway-Peer-Key": "team-a"},
              {"X-Gateway-Peer": "0" * 64, "X-Gateway-Peer-Key": "team-a"}]
    async with (keyed_workers(f"{url}/v1", tmp_path, socket_dir) as gateway,
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as tcp):
        for headers in forged:
            for socket in gateway.sockets:  # where nginx and the peers connect
                status, body, _ = await post(socket, chat("forged"), headers)
                assert (status, body["error"]["code"]) == (401, "invalid_api_key"), body
                # A valid key may not borrow another key's models through the header.
                status, body, _ = await post(socket, chat("forged"),
                                             {**headers, **bearer("only-other")})
                assert (status, body["error"]["code"]) == (403, "model_not_allowed"), body
            async with tcp.post(f"{gateway.url}/v1/chat/completions", json=chat("forged"),
                                headers=headers) as response:
                assert response.status == 401, await response.text()
        pids = [gateway.proxy.process.pid] + [
            int(str((await unix_healthz(path))["pid"])) for path in gateway.sockets]
        secret = peer_secret(pids[0], pids[1:])
    assert secret not in gateway.proxy.output()
    assert answered(upstream) == 0


def peer_secret(supervisor: int, workers: list[int]) -> str:
    """The secret the workers were started with (from their initial environment), after
    checking it is on no command line and not in the supervisor's own environment."""
    environ = Path(f"/proc/{workers[0]}/environ").read_bytes().split(b"\0")
    found = [e.decode().partition("=")[2] for e in environ
             if e.startswith(f"{PEER_SECRET_ENV}=".encode())]
    assert len(found) == 1 and len(found[0]) == 64, f"no {PEER_SECRET_ENV} in a worker"
    for pid in (supervisor, *workers):
        assert found[0] not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    assert PEER_SECRET_ENV not in Path(f"/proc/{supervisor}/environ").read_text(
        errors="replace")
    return found[0]


async def test_a_forwarded_request_counts_once_against_the_rate_limit(
    start_fake: StartFake, tmp_path: Path, socket_dir: Path
) -> None:
    """``limited`` has 12 requests a minute in each worker (memory backend). 12 distinct
    deterministic requests sent to worker 0 are forwarded when worker 1 owns their key
    (all but 1 in 4096 orders): worker 1 must not count them against its own bucket."""
    upstream = await start_fake(pieces=("answer",))
    url = upstream.url.removesuffix("/v1")
    async with keyed_workers(f"{url}/v1", tmp_path, socket_dir) as gateway:
        first, second = gateway.sockets
        replies = await asyncio.gather(*(post(first, chat(f"limited {i}"), bearer("limited"))
                                         for i in range(12)))
        assert [status for status, _, _ in replies] == [200] * 12, replies
        # Sampled requests are never forwarded: worker 1 answers them from its own bucket.
        replies = [await post(second, chat(f"sampled {i}", temperature=1), bearer("limited"))
                   for i in range(12)]
        assert [status for status, _, _ in replies] == [200] * 12, replies
        assert replies[0][2] == "11"
