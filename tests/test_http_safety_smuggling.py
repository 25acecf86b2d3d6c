"""Request smuggling and malformed HTTP (issue #4): every ambiguous or broken framing is
refused with an OpenAI-shaped 400 (501 for a transfer coding other than chunked) or a
closed connection, and NEVER reaches the upstream; the next valid request, on a fresh
connection, works. Raw bytes on a raw socket to the real gateway; the upstream records
every request it gets. The same through the shipped nginx config, where nginx is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from pathlib import Path

import pytest

from tests.conftest import StartUpstream
from tests.nginx_helpers import behind_nginx, needs_nginx
from tests.raw_http import (
    CHAT_BODY,
    Connect,
    Recorder,
    Safe,
    chat_request,
    one_reply,
    read_until,
    recording_upstream,
)

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
N = len(CHAT_BODY)


def chunked(body: bytes = CHAT_BODY) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


# Each would carry a valid chat request if its framing were accepted.
CASES = {
    "content-length and transfer-encoding": HEAD + b"Content-Length: %d\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" % N + chunked(),
    "transfer-encoding and content-length": HEAD + b"Transfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n" + chunked(),
    "CL.TE with a smuggled request": HEAD + b"Content-Length: 6\r\nTransfer-Encoding: "
        b"chunked\r\n\r\n0\r\n\r\n" + chat_request(),
    "conflicting content-lengths": HEAD + b"Content-Length: %d\r\nContent-Length: %d\r\n"
        b"\r\n" % (N, N + 1) + CHAT_BODY + b"x",
    "repeated content-length": HEAD + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
        % (N, N) + CHAT_BODY,
    "content-length list": HEAD + b"Content-Length: %d, %d\r\n\r\n" % (N, N) + CHAT_BODY,
    "signed content-length": HEAD + b"Content-Length: +%d\r\n\r\n" % N + CHAT_BODY,
    "negative content-length": HEAD + b"Content-Length: -1\r\n\r\n" + CHAT_BODY,
    "hex content-length": HEAD + b"Content-Length: 0x%x\r\n\r\n" % N + CHAT_BODY,
    "transfer-encoding not final": HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n"
        + chunked(),
    "transfer-encoding xchunked": HEAD + b"Transfer-Encoding: xchunked\r\n\r\n" + chunked(),
    "transfer-encoding gzip, chunked": HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
        + chunked(),
    "transfer-encoding gzip": HEAD + b"Transfer-Encoding: gzip\r\n\r\n" + CHAT_BODY,
    "transfer-encoding gzip and content-length": HEAD + b"Transfer-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n" % N + CHAT_BODY,
    "transfer-encoding chunked, gzip": HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\n"
        + chunked(),
    "space before the colon": HEAD + b"Transfer-Encoding : chunked\r\n\r\n" + chunked(),
    "transfer-encoding twice": HEAD + b"Transfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked(),
    "transfer-encoding obs-folded": HEAD + b"Transfer-Encoding:\r\n chunked\r\n\r\n"
        + chunked(),
    "obs-fold": HEAD + b"X-A: a\r\n  folded\r\nContent-Length: %d\r\n\r\n" % N + CHAT_BODY,
    "bare LF line endings": HEAD.replace(b"\r\n", b"\n") + b"Content-Length: %d\n\n" % N
        + CHAT_BODY,
    "a bare LF in the head": HEAD + b"X-A: a\nContent-Length: %d\r\n\r\n" % N + CHAT_BODY,
    "a bare CR in the head": HEAD + b"X-A: a\rContent-Length: %d\r\n\r\n" % N + CHAT_BODY,
    "NUL in a header value": HEAD + b"X-A: a\x00b\r\nContent-Length: %d\r\n\r\n" % N
        + CHAT_BODY,
    "space in a header name": HEAD + b"X A: b\r\nContent-Length: %d\r\n\r\n" % N + CHAT_BODY,
    "no Host on HTTP/1.1": HEAD.replace(b"Host: gw\r\n", b"") + b"Content-Length: %d\r\n"
        b"\r\n" % N + CHAT_BODY,
    "chunk size not hex": HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
        + CHAT_BODY + b"\r\n0\r\n\r\n",
    "chunk size overflowing": HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
        b"1%s\r\n" % (b"0" * 20) + CHAT_BODY + b"\r\n0\r\n\r\n",
    "chunk longer than its size": HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n"
        % (N - 5) + CHAT_BODY + b"\r\n0\r\n\r\n",
    "chunks framed with bare LF": HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\n" % N
        + CHAT_BODY + b"\n0\n\n",
    "bare LF in a chunk extension": HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x;a\nb\r\n"
        % N + CHAT_BODY + b"\r\n0\r\n\r\n",
    "HTTP/0.9": b"GET /v1/models\r\n\r\n",
    "chunked on HTTP/1.0": HEAD.replace(b"HTTP/1.1", b"HTTP/1.0") + b"Connection: keep-alive"
        b"\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(),
    "a tab in the request line": chat_request().replace(b"POST ", b"POST\t", 1),
    "a lower-case version": chat_request().replace(b"HTTP/1.1", b"http/1.1", 1),
    "a control character in the target": chat_request().replace(b"completions",
                                                                b"comp\x01letions", 1),
    "garbage": b"\x00\x01\x02\x03 not http at all\r\n\r\n",
    "words": b"HELLO WORLD\r\n\r\n",
    "a TLS client hello": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32)
        + b"\r\n\r\n",
    "the HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "an unknown HTTP version": chat_request().replace(b"HTTP/1.1", b"HTTP/1.7", 1),
}


async def answer_to(url: str, data: bytes, connect: Connect, then: bytes = b"") -> bytes:
    """Everything the gateway sends back until it closes (failing after 5 s)."""
    client = await connect(url)
    with contextlib.suppress(ConnectionError):
        await client.send(data)
        if then:
            await asyncio.sleep(0.2)  # the head and the first chunk went through
            await client.send(then)
    try:
        return await read_until(client.reader, within=5)
    except ConnectionError:
        return b""


def assert_refused(answer: bytes, statuses: tuple[int, ...] = (400,)) -> None:
    """A closed connection, or one OpenAI-shaped error and nothing else."""
    if not answer:
        return
    assert len(re.findall(rb"(?:^|\n)HTTP/1\.[01] \d{3} ", answer)) == 1, answer
    status = int(answer.split(b" ", 2)[1])
    assert status in statuses, answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer
    assert body.startswith(b'{"error":{"message":'), answer


@pytest.mark.parametrize("data", CASES.values(), ids=CASES.keys())
async def test_ambiguous_or_malformed_requests_never_reach_the_upstream(
        safe_gateway: Safe, connect: Connect, data: bytes) -> None:
    url, upstream = await safe_gateway()
    answer = await answer_to(url, data, connect)
    assert_refused(answer, (400, 501))
    assert upstream.requests == []
    assert (await one_reply(url, chat_request())).status == 200
    assert upstream.requests == [("POST", "/v1/chat/completions", CHAT_BODY)]


@pytest.mark.parametrize("case", ["transfer-encoding gzip, chunked", "transfer-encoding gzip"])
async def test_a_transfer_coding_other_than_chunked_gets_501(
        safe_gateway: Safe, connect: Connect, case: str) -> None:
    """As the README says, ``gzip`` alone too (issue 9: it was llhttp's 400)."""
    url, upstream = await safe_gateway()
    answer = await answer_to(url, CASES[case], connect)
    assert re.match(rb"HTTP/1\.[01] 501 ", answer), answer
    assert b'"code":"unsupported_transfer_encoding"' in answer
    assert b"Connection: close" in answer
    assert upstream.requests == []


@pytest.mark.parametrize("case", [
    "transfer-encoding gzip and content-length", "transfer-encoding chunked, gzip",
    "transfer-encoding not final", "transfer-encoding twice", "transfer-encoding obs-folded",
    "content-length and transfer-encoding"])
async def test_an_ambiguous_transfer_encoding_stays_400(
        safe_gateway: Safe, connect: Connect, case: str) -> None:
    """Framing two parsers could read differently is malformed, not merely unsupported."""
    url, upstream = await safe_gateway()
    answer = await answer_to(url, CASES[case], connect)
    assert re.match(rb"HTTP/1\.[01] 400 ", answer), answer
    assert b'"code":"malformed_request"' in answer
    assert upstream.requests == []


async def test_parser_errors_are_openai_shaped(safe_gateway: Safe, connect: Connect) -> None:
    url, _ = await safe_gateway()
    answer = await answer_to(url, CASES["content-length and transfer-encoding"], connect)
    assert answer.startswith(b"HTTP/1.0 400 ")
    assert b'"code":"malformed_request"' in answer and b"Connection: close" in answer


async def test_a_malformed_chunk_after_a_valid_one_fails_the_request(
        safe_gateway: Safe, connect: Connect) -> None:
    """The head was valid and the handler is reading the body when the framing breaks:
    the request fails at once (not at the body timeout), and nothing goes upstream."""
    url, upstream = await safe_gateway(body_timeout=30)
    first = HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (N - 5, CHAT_BODY[:-5])
    answer = await answer_to(url, first, connect, then=b"zz\r\n" + CHAT_BODY[-5:] + b"\r\n")
    assert answer, "the connection hung until the body timeout"
    assert_refused(answer)
    assert b'"code":"malformed_request"' in answer and b"Connection: close" in answer
    assert upstream.requests == []


async def test_a_request_smuggled_in_a_body_is_only_a_body(safe_gateway: Safe,
                                                           connect: Connect) -> None:
    """Control: a request line inside a well-framed body is data, forwarded as such."""
    url, upstream = await safe_gateway()
    inner = chat_request()
    body = b'{"model":"m","messages":[{"role":"user","content":%s}]}' % (
        b'"' + inner.replace(b'"', b'\\"').replace(b"\r\n", b"\\r\\n") + b'"')
    answer = await answer_to(url, chat_request(b"Connection: close\r\n", body=body), connect)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert upstream.requests == [("POST", "/v1/chat/completions", body)]


NGINX_CASES = ("content-length and transfer-encoding", "CL.TE with a smuggled request",
               "conflicting content-lengths", "transfer-encoding gzip, chunked",
               "bare LF in a chunk extension", "chunk size not hex", "obs-fold")


@needs_nginx
async def test_through_nginx_nothing_malformed_reaches_the_upstream(
        start_upstream: StartUpstream, tmp_path: Path) -> None:
    """nginx refuses most of these itself; whatever it passes on, the gateway refuses."""
    recorder = Recorder()
    upstream = await start_upstream(recording_upstream(recorder))
    async with behind_nginx(upstream, tmp_path) as deployment:
        tls = deployment.tls()
        for name in NGINX_CASES:
            answer = await _over_tls(deployment.port, tls, CASES[name].replace(
                b"Host: gw", b"Host: localhost"))
            status = int(answer.split(b" ", 2)[1]) if answer else 0
            assert status in (0, 400, 501, 502), (name, answer)
        assert recorder.requests == []
        valid = chat_request(b"Connection: close\r\n").replace(b"Host: gw", b"Host: localhost")
        assert (await _over_tls(deployment.port, tls, valid)).startswith(b"HTTP/1.1 200 ")
        assert recorder.requests == [("POST", "/v1/chat/completions", CHAT_BODY)]


async def _over_tls(port: int, tls: ssl.SSLContext, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls,
                                                   server_hostname="localhost")
    try:
        writer.write(data)
        await writer.drain()
        return await read_until(reader, within=10)
    except ConnectionError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()
