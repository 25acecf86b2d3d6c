"""Response compression (issue 10): bytes and time, gzip vs identity, through the gateway.

Two answers, both from an upstream served in this process on 127.0.0.1:

* ``embeddings``: ``POST /v1/embeddings``, 16 inputs x 1536 floats (~509 KiB of JSON,
  as vLLM sends it; over ``SMALL_ANSWER``, so the gateway compresses it as it streams);
* ``models``: ``GET /v1/models`` of 300 models (~26 KiB; the gateway's own JSON).

Each is fetched ``--requests`` times per variant, the variants interleaved round by
round: ``identity`` (``Accept-Encoding: identity``), ``gzip-1`` and ``gzip-6`` (two
gateways, ``compression.level`` 1 and 6). ``bytes`` is the body on the wire; ``ms`` the
client-side median from sending the request to holding the decoded JSON (decompression
included), all on one loop, so it counts the gateway's and the client's work but no
network; ``ms @100 Mbit/s`` adds the time those bytes take on a 100 Mbit/s link
(computed, not measured), where compression pays. The last table is zlib alone on the
same bodies, in this process: CPU time per body for each level.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import statistics
import time
import zlib
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import orjson
import uvloop
from aiohttp import web

from proxy.config.loader import config_from_dict
from proxy.mock.payloads import EmbeddingInput, embeddings
from proxy.providers import PROVIDER_TYPES
from proxy.server.serve import running

MODELS = [f"model-{i:03d}-instruct-org{i % 7}" for i in range(300)]
EMBED_REQUEST = {"model": MODELS[0], "input": [f"text {i}" for i in range(16)]}
LINK_BYTES_PER_S = 100e6 / 8
VARIANTS = ("identity", "gzip-1", "gzip-6")


def embeddings_body(count: int = 16, dim: int = 1536) -> bytes:
    inputs = [EmbeddingInput(orjson.dumps(f"text {i}"), 2) for i in range(count)]
    return orjson.dumps(embeddings(MODELS[0], inputs, dim, as_base64=False))


def upstream_app(embedding: bytes) -> web.Application:
    listing = orjson.dumps({"object": "list", "data": [
        {"id": m, "object": "model", "created": 0, "owned_by": "bench"} for m in MODELS]})

    async def models(request: web.Request) -> web.Response:
        return web.Response(body=listing, content_type="application/json")

    async def embed(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=embedding, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/embeddings", embed)
    return app


async def fetch(session: aiohttp.ClientSession, base: str, case: str, accept: str
                ) -> tuple[int, float, bytes]:
    """One request: wire bytes, seconds until the JSON is decoded, the decoded body."""
    headers = {"Accept-Encoding": accept}
    started = time.perf_counter()
    if case == "embeddings":
        request = session.post(f"{base}/v1/embeddings", json=EMBED_REQUEST, headers=headers)
    else:
        request = session.get(f"{base}/v1/models", headers=headers)
    async with request as response:
        response.raise_for_status()
        raw = await response.read()
        gzipped = response.headers.get("Content-Encoding") == "gzip"
    body = gzip.decompress(raw) if gzipped else raw
    orjson.loads(body)
    elapsed = time.perf_counter() - started
    if gzipped != (accept == "gzip"):
        raise RuntimeError(f"{case}: asked {accept}, got gzipped={gzipped}")
    return len(raw), elapsed, body


async def measure(requests: int, rounds: int) -> dict[str, Any]:
    embedding = embeddings_body()
    async with AsyncExitStack() as stack:
        runner = web.AppRunner(upstream_app(embedding), access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        upstream = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        bases = {level: await stack.enter_async_context(running(config_from_dict({
            "server": {"host": "127.0.0.1", "port": 0}, "cache": {"enabled": False},
            "dedup": {"mode": "off"}, "compression": {"level": level},
            "providers": [{"name": "up", "type": "openai_compat", "base_url": upstream}],
        }, {}, PROVIDER_TYPES.keys()))) for level in (1, 6)}
        session = await stack.enter_async_context(
            aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",)))
        targets = {"identity": (bases[1], "identity"), "gzip-1": (bases[1], "gzip"),
                   "gzip-6": (bases[6], "gzip")}
        seen: dict[tuple[str, str], list[float]] = {}
        sizes: dict[tuple[str, str], int] = {}
        bodies: dict[str, bytes] = {}
        for case in ("embeddings", "models"):
            for base, accept in targets.values():  # warm-up: connections, discovery
                await fetch(session, base, case, accept)
        for _ in range(rounds):
            for case in ("embeddings", "models"):
                for variant, (base, accept) in targets.items():
                    for _ in range(requests):
                        size, seconds, body = await fetch(session, base, case, accept)
                        seen.setdefault((case, variant), []).append(seconds)
                        sizes[case, variant] = size
                        if bodies.setdefault(case, body) != body:
                            raise RuntimeError(f"{case} {variant}: decoded body differs")
    return {"results": [{
        "case": case, "variant": variant, "bytes": sizes[case, variant],
        "ratio": round(sizes[case, variant] / sizes[case, "identity"], 4),
        "ms_median": round(statistics.median(times) * 1000, 3),
        "ms_at_100mbit": round((statistics.median(times)
                                + sizes[case, variant] / LINK_BYTES_PER_S) * 1000, 2),
        "requests": len(times)} for (case, variant), times in seen.items()],
        "zlib": zlib_levels({"embeddings": embedding, "models": bodies["models"]})}


def zlib_levels(bodies: dict[str, bytes], repeat: int = 20) -> list[dict[str, Any]]:
    """CPU time of one gzip of each body at levels 1, 3, 6 (median of ``repeat``)."""
    rows = []
    for case, body in bodies.items():
        for level in (1, 3, 6):
            times = []
            for _ in range(repeat):
                started = time.process_time()
                packed = zlib.compress(body, level, wbits=31)
                times.append(time.process_time() - started)
            rows.append({"case": case, "level": level, "in": len(body), "out": len(packed),
                         "ms": round(statistics.median(times) * 1000, 3)})
    return rows


def print_report(report: dict[str, Any]) -> None:
    print("| answer | variant | bytes | of identity | ms (median, loopback) "
          "| ms @100 Mbit/s (computed) | requests |\n|---|---|---|---|---|---|---|")
    for r in report["results"]:
        print(f"| {r['case']} | {r['variant']} | {r['bytes']:,} | {r['ratio']:.1%} "
              f"| {r['ms_median']:.2f} | {r['ms_at_100mbit']:.2f} | {r['requests']} |")
    print("\n| body | zlib level | in | out | CPU ms |\n|---|---|---|---|---|")
    for z in report["zlib"]:
        print(f"| {z['case']} | {z['level']} | {z['in']:,} | {z['out']:,} | {z['ms']:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compression",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20, choices=range(1, 201),
                        metavar="1-200", help="per variant and round (20)")
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 11),
                        metavar="1-10", help="interleaved rounds (3)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds before the run is abandoned (120)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = uvloop.run(asyncio.wait_for(measure(args.requests, args.rounds),
                                         timeout=min(args.timeout, 600)))
    if args.json:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print_report(report)


if __name__ == "__main__":
    main()
