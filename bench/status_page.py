"""A screenshot of the status page under some traffic (``docs/status-page.png``).

    python -m bench.status_page docs/status-page.png

Starts the mock upstream and a gateway on loopback (one healthy provider, one whose
port is closed, so the page shows both colours), sends a bounded mix of traffic
(cacheable and sampled chats, streams, calls to the dead provider, an unknown model)
while headless Chromium (``bench/cdp.py``) shows ``/ui``, and saves the page.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import socket
from pathlib import Path
from tempfile import TemporaryDirectory

import aiohttp
from aiohttp import web

from bench.cdp import chromium, find_chromium
from proxy.config.loader import config_from_dict
from proxy.mock.server import MockOptions, create_app
from proxy.providers import PROVIDER_TYPES
from proxy.server.serve import running

ROUNDS = 40  # bounded: about 8 s of traffic at one round per 0.2 s


async def _traffic(session: aiohttp.ClientSession, url: str, n: int) -> None:
    def chat(model: str, text: str, temperature: float, stream: bool = False
             ) -> dict[str, object]:
        return {"model": model, "temperature": temperature, "stream": stream,
                "messages": [{"role": "user", "content": text}]}

    bodies = [chat("mock-gpt", f"faq {n % 4}", 0), chat("mock-gpt", f"q {n}", 0.7),
              chat("mock-gpt", f"s {n}", 0.7, stream=True)]
    if n % 4 == 0:
        bodies.append(chat("llama-3", "hi", 0.7))  # the dead provider: 502
    if n % 10 == 0:
        bodies.append(chat("no-such-model", "hi", 0))  # 404

    async def send(body: dict[str, object]) -> None:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            await response.read()

    await asyncio.gather(*(send(b) for b in bodies))


async def main(out: Path) -> None:
    binary = find_chromium()
    if binary is None:
        raise SystemExit("chromium is not installed")
    runner = web.AppRunner(create_app(MockOptions(latency=0.03, chunks=6, interval=0.01)))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    mock_port = runner.addresses[0][1]
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        config = config_from_dict({"providers": [
            {"name": "openai-local", "type": "openai_compat",
             "base_url": f"http://127.0.0.1:{mock_port}/v1", "models": ["mock-gpt"]},
            {"name": "ollama-box", "type": "openai_compat",
             "base_url": f"http://127.0.0.1:{closed.getsockname()[1]}/v1",
             "models": ["llama-3"]}]}, {}, PROVIDER_TYPES.keys())
        config = dataclasses.replace(config, server=dataclasses.replace(
            config.server, host="127.0.0.1", port=0))
        try:
            with TemporaryDirectory() as profile:
                async with running(config) as url, aiohttp.ClientSession() as session, \
                        chromium(Path(profile), binary, size=(1280, 760)) as page:
                    await page.goto(f"{url}/ui")
                    for n in range(ROUNDS):
                        await _traffic(session, url, n)
                        await asyncio.sleep(0.2)
                    updates = await page.evaluate("Number(document.body.dataset.updates)")
                    await page.wait_for(f"Number(document.body.dataset.updates) > {updates}")
                    png = await page.screenshot()
                    await asyncio.to_thread(out.write_bytes, png)
        finally:
            await runner.cleanup()
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/status-page.png"))
    asyncio.run(main(parser.parse_args().out))
