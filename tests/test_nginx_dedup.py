"""The dedup target of issue #3 through the shipped nginx config (``test_nginx.py``
runs it): "50 identical concurrent requests (temperature 0) against a 200 ms upstream ->
1 upstream call, also when they arrive through the shipped nginx config in front of 2
workers".
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
from multidict import CIMultiDict

from tests.conftest import StartFake
from tests.fake_upstream import FakeUpstream
from tests.nginx_helpers import Deployment, behind_nginx, needs_nginx

BURST = 50
Reply = tuple[int, str, bytes]  # status, X-Gateway-Dedup, body


def prompts(fake: FakeUpstream) -> list[str]:
    """The prompt of each chat call the fake upstream got, in order."""
    return [body["messages"][0]["content"] for body in fake.bodies()]


async def burst(deployment: Deployment, tag: str, prompt: str,
                extra: dict[str, str]) -> list[Reply]:
    """``BURST`` identical chat requests (temperature 0), each on its own HTTPS connection
    to nginx. Every connection is opened (TLS done) first, then every request is written
    in one synchronous loop: the upstream runs on this test's event loop, so its 200 ms
    cannot start before all of them are on the wire. HTTP/1.0: nginx closes each
    connection after its answer, so a reply is everything read until EOF."""
    body = orjson.dumps({"model": "m", "temperature": 0,
                         "messages": [{"role": "user", "content": prompt}]})
    streams = await asyncio.gather(*(
        asyncio.open_connection("127.0.0.1", deployment.port, ssl=deployment.tls())
        for _ in range(BURST)))
    try:
        for i, (_, writer) in enumerate(streams):
            headers = {"Host": f"127.0.0.1:{deployment.port}", "X-Request-ID": f"{tag}-{i}",
                       "Content-Type": "application/json", "Content-Length": str(len(body)),
                       **extra}
            head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            writer.write(f"POST /v1/chat/completions HTTP/1.0\r\n{head}\r\n".encode() + body)
        raw = await asyncio.wait_for(
            asyncio.gather(*(reader.read() for reader, _ in streams)), 10)
    finally:
        for _, writer in streams:
            writer.transport.abort()
    return [_parse_reply(data) for data in raw]


def _parse_reply(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = CIMultiDict((name, value.strip())
                          for name, _, value in (line.partition(":") for line in lines))
    return int(status_line.split()[1]), headers.get("X-Gateway-Dedup", ""), body


@needs_nginx
async def test_identical_requests_through_nginx_make_one_upstream_call(
    start_fake: StartFake, tmp_path: Path
) -> None:
    upstream = await start_fake(latency=0.2)  # numbered answers: two calls never look alike
    async with behind_nginx(upstream.url.removesuffix("/v1"), tmp_path) as deployment:
        started = time.monotonic()
        replies = await burst(deployment, "shared", "same question", {})
        elapsed = time.monotonic() - started
        assert [status for status, _, _ in replies] == [200] * BURST, replies[0]
        assert {body for _, _, body in replies} == {replies[0][2]}
        assert orjson.loads(replies[0][2])["id"] == "answer-1"
        assert sorted(role for _, role, _ in replies) == ["follower"] * (BURST - 1) + ["leader"]
        assert prompts(upstream) == ["same question"]
        assert elapsed < 5, f"the burst took {elapsed:.2f} s"

        # The control: `X-Gateway-Peer` without a valid proof turns cross-worker forwarding
        # off for a request, so each worker deduplicates only what it received: one call
        # per worker. Two calls: least_conn gave the burst to both workers, as it did the
        # burst above, which without forwarding would have made two calls too.
        replies = await burst(deployment, "local", "other question", {"X-Gateway-Peer": "1"})
        assert [status for status, _, _ in replies] == [200] * BURST, replies[0]
        assert prompts(upstream)[1:] == ["other question"] * 2
        assert len({body for _, _, body in replies}) == 2
        roles = [role for _, role, _ in replies]
        assert (roles.count("leader"), roles.count("follower")) == (2, BURST - 2)
