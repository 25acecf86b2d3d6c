"""Narrow unit tests of the upstream client's exception table. aioresponses fakes the
transport because these failures cannot be produced reliably by a real server; answers
with a status are covered against real servers elsewhere (aioresponses 0.7.9 cannot
build aiohttp 3.14 responses)."""

from __future__ import annotations

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL

from proxy.config.loader import Config
from proxy.errors import (
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.upstream.client import UpstreamClient

MODELS_URL = URL("http://upstream.test/v1/models")


@pytest.mark.parametrize(("exc", "expected", "code"), [
    (aiohttp.ServerDisconnectedError(), UpstreamUnreachable, "upstream_unreachable"),
    (aiohttp.SocketTimeoutError(), UpstreamTimeout, "upstream_timeout"),
    (aiohttp.ConnectionTimeoutError(), UpstreamTimeout, "upstream_timeout"),
    (TimeoutError(), UpstreamTimeout, "upstream_timeout"),
    (aiohttp.ClientPayloadError("cut"), UpstreamProtocolError, "upstream_protocol_error"),
    (aiohttp.ClientConnectionError(), UpstreamUnreachable, "upstream_unreachable"),
    (aiohttp.ClientError(), UpstreamError, "upstream_error"),
])
async def test_client_exceptions_map_to_gateway_errors(
    exc: BaseException, expected: type[UpstreamError], code: str,
) -> None:
    client = UpstreamClient(Config())
    await client.start()
    try:
        with aioresponses() as fake:
            fake.get(MODELS_URL, exception=exc)
            with pytest.raises(expected) as raised:
                await client.get_json(MODELS_URL, {}, "prov")
    finally:
        await client.close()
    assert type(raised.value) is expected
    assert raised.value.code == code
    assert "'prov'" in raised.value.message
    assert "upstream.test" not in raised.value.message
