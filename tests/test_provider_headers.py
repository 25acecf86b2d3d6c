"""A provider's own headers (``headers:``, its key) on the upstream request: each name
once, whatever its case or who else set it (HTTP names ignore case, so a configured
``authorization`` and the key's ``Authorization`` would both have gone upstream), on the
proxied requests and on discovery's; and refused at load when they could not work."""

from __future__ import annotations

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.call import Call
from proxy.config.loader import ConfigError, config_from_dict
from proxy.providers import PROVIDER_TYPES, build_provider
from proxy.upstream.protocol import serialize
from tests.conftest import StartLive, StartUpstream
from tests.fake_upstream import MODELS, FakeUpstream

KEY = "sk-provider-headers-key"


async def test_each_provider_header_goes_upstream_once_whatever_its_case(
    fake_upstream: FakeUpstream, start_upstream: StartUpstream, live_gateway: StartLive,
) -> None:
    fake_upstream.url = f"{await start_upstream(fake_upstream.app())}/v1"
    entry = {"name": "up", "type": "openai_compat", "base_url": fake_upstream.url,
             "api_key_env": "PROVIDER_HEADERS_KEY",  # no static models: discovery asks
             "headers": {"authorization": "Bearer configured", "X-Title": "ours",
                         "Accept": "application/vnd.ours+json"}}
    gateway = await live_gateway(entry, env={"PROVIDER_HEADERS_KEY": KEY},
                                 cache={"enabled": False})
    async with aiohttp.ClientSession() as session, session.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": "Bearer client", "x-title": "client's"},
    ) as answer:
        assert answer.status == 200, await answer.text()
    (chat,) = fake_upstream.headers()
    assert chat.getall("Authorization") == [f"Bearer {KEY}"]
    assert chat.getall("X-Title") == ["ours"]
    assert chat.getall("Accept") == ["application/vnd.ours+json"]
    listing = fake_upstream.headers(MODELS)[-1]  # discovery: the control-plane request
    assert listing.getall("Authorization") == [f"Bearer {KEY}"]
    assert listing.getall("Accept") == ["application/vnd.ours+json"]  # replaced ours


@pytest.mark.parametrize(("headers", "problem"), [
    ({"X-Api-Key": "a", "x-api-key": "b"}, "'x-api-key' is given twice (header names ignore case)"),
    ({"Host": "elsewhere"}, "'Host' is set by the gateway itself and cannot be configured"),
    ({"content-length": "0"}, "'content-length' is set by the gateway itself"),
    ({"X-A": "a\x00b"}, "value of 'X-A' must be a single-line string"),
    ({"X-A": "a\nb"}, "value of 'X-A' must be a single-line string"),
])
def test_provider_headers_that_could_not_work_are_refused(
    headers: dict[str, str], problem: str,
) -> None:
    entry = {"name": "up", "type": "openai_compat", "base_url": "http://127.0.0.1:9/v1",
             "headers": headers}
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"providers": [entry]}, {}, PROVIDER_TYPES.keys())
    (found,) = caught.value.problems
    assert found.startswith("providers[0].headers: ") and problem in found, found


def test_ollama_forwards_a_lower_case_authorization_and_its_other_kept_headers() -> None:
    """HTTP/2 clients (through nginx) send every name in lower case."""
    config = config_from_dict({"providers": [{
        "name": "llama", "type": "ollama", "base_url": "http://127.0.0.1:9"}]},
        {}, PROVIDER_TYPES.keys()).providers[0]
    provider = build_provider(config)
    headers = CIMultiDict({"authorization": "Bearer client", "x-request-id": "r-1",
                           "cookie": "not for ollama"})
    call = Call("POST", "chat/completions", "", b"{}",
                {"model": "m", "messages": []}, "m", False, headers, "r-1")
    head = serialize(provider.prepare(call), "127.0.0.1:9").split(b"\r\n\r\n")[0]
    lines = head.split(b"\r\n")[1:]
    assert b"authorization: Bearer client" in lines and b"x-request-id: r-1" in lines
    assert not any(line.lower().startswith(b"cookie") for line in lines)
    assert URL(f"http://x{head.split()[1].decode()}").path == "/api/chat"
