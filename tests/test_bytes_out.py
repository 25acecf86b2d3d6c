"""``bytes_out`` (the record, the access line) is the answer's body as it went on the
wire, for a whole answer and for a stream alike (README "Logs": "answer body sizes"):
before, a stream's count included its head and a whole answer's did not."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.conftest import MakeConfig, StartUpstream
from tests.fake_upstream import FakeUpstream
from tests.observing import observed, provider, until
from tests.raw_http import Raw, chat_request


@pytest.mark.parametrize("stream", [False, True])
async def test_bytes_out_is_the_body_on_the_wire(
    stream: bool, start_upstream: StartUpstream, make_config: MakeConfig,
) -> None:
    fake = FakeUpstream()
    url = await start_upstream(fake.app())
    config = make_config([provider("up", url)], cache={"enabled": False})
    body = orjson.dumps({"model": "m", "stream": stream,
                         "messages": [{"role": "user", "content": "hi"}]})
    async with observed(config) as (gateway, seen):
        raw = await Raw.open(gateway)
        try:
            await raw.send(chat_request(b"Connection: close\r\n", body=body))
            wire = await asyncio.wait_for(raw.reader.read(-1), 10)  # until the close
        finally:
            await raw.close()
        await until(seen, 1)
    head, _, sent = wire.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert (b"transfer-encoding: chunked" in head.lower()) is stream
    (record,) = seen
    assert record.bytes_out == len(sent) > 0
