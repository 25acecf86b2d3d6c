"""``read_until`` (tests/raw_http.py), the bounded read the raw-socket tests wait with:
it returns the moment its bytes are there, and fails, saying what came, when they are
not (issue 11)."""

from __future__ import annotations

import asyncio

import pytest

from tests.raw_http import read_until


def fed(*pieces: bytes, eof: bool = False) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for piece in pieces:
        reader.feed_data(piece)
    if eof:
        reader.feed_eof()
    return reader


async def test_a_marker_a_count_and_the_close_each_end_the_read() -> None:
    reader = fed(b"HTTP/1.1 200 OK\r\n\r\nbody", b"rest", eof=True)
    assert await read_until(reader, b"\r\n\r\n", within=1) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert await read_until(reader, count=4, within=1) == b"body"
    assert await read_until(reader, within=1) == b"rest"


async def test_bytes_arriving_later_are_waited_for() -> None:
    reader = fed(b"data: 1\n\n")
    asyncio.get_running_loop().call_later(0.05, reader.feed_data, b"data: [DONE]\n\n")
    assert await read_until(reader, b"[DONE]\n\n", within=2) == b"data: 1\n\ndata: [DONE]\n\n"


async def test_what_never_comes_fails_in_time_saying_what_came() -> None:
    with pytest.raises(AssertionError, match=r"not within 0\.1 s"):
        await read_until(fed(b"partial"), b"\r\n\r\n", within=0.1)
    with pytest.raises(AssertionError, match=r"not closed within 0\.1 s; came: b'partial'"):
        await read_until(fed(b"partial"), within=0.1)
    with pytest.raises(asyncio.IncompleteReadError):  # closed before the count
        await read_until(fed(b"abc", eof=True), count=5, within=1)
