"""HTTP/1 framing decisions and wire forms: byte tables, and llhttp as the judge."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.proto.http1 import (
    END_CHUNKED,
    Body,
    RequestBody,
    chunk,
    chunk_size_line,
    interim_head,
    is_close_delimited,
    last_chunk,
    request_body,
    request_framing_field,
    request_head,
    response_body,
    response_framing_field,
    response_head,
)

# (method, status, Content-Length, chunked, HTTP/1.0 client, body modules) -> body
RESPONSES = [
    (b"GET", 200, 5, False, False, False, Body.RAW),
    (b"GET", 200, 0, False, False, False, Body.RAW),
    (b"GET", 200, 5, False, True, True, Body.RAW),  # a length is kept, filtered or not
    (b"GET", 200, -1, True, False, False, Body.RAW),
    (b"GET", 200, -1, True, False, True, Body.RECHUNK),
    (b"GET", 200, -1, True, True, False, Body.DECHUNK),
    (b"GET", 200, -1, True, True, True, Body.DECHUNK),
    (b"GET", 200, -1, False, False, False, Body.WRAP),
    (b"GET", 200, -1, False, False, True, Body.WRAP),
    (b"GET", 200, -1, False, True, False, Body.RAW),
    (b"POST", 500, -1, False, True, False, Body.RAW),
    (b"HEAD", 200, 5, False, False, False, Body.NONE),
    (b"HEAD", 200, -1, True, False, False, Body.NONE),
    (b"HEAD", 200, -1, False, False, False, Body.NONE),
    (b"GET", 204, -1, False, False, False, Body.NONE),
    (b"GET", 304, 10, False, False, False, Body.NONE),
    (b"GET", 100, -1, False, False, False, Body.INTERIM),
    (b"GET", 103, -1, False, True, False, Body.INTERIM),
    (b"GET", 101, -1, False, False, False, Body.TUNNEL),
    (b"CONNECT", 200, -1, False, False, False, Body.TUNNEL),
    (b"CONNECT", 299, 5, False, False, False, Body.TUNNEL),
    (b"CONNECT", 407, 5, False, False, False, Body.RAW),
    (b"DELETE", 205, 0, False, False, False, Body.RAW),
]


@pytest.mark.parametrize(
    ("method", "status", "length", "chunked", "http10", "filtered", "want"), RESPONSES
)
def test_response_body(
    method: bytes,
    status: int,
    length: int,
    chunked: bool,
    http10: bool,
    filtered: bool,
    want: Body,
) -> None:
    assert response_body(method, status, length, chunked, http10, filtered) is want


@pytest.mark.parametrize(
    ("body", "length", "chunked", "codings", "field", "close_delimited"),
    [
        (Body.RAW, 5, False, b"", b"", False),
        (Body.RAW, -1, True, b"chunked", b"Transfer-Encoding: chunked\r\n", False),
        (Body.RAW, -1, True, b"gzip, chunked", b"Transfer-Encoding: gzip, chunked\r\n", False),
        (Body.RECHUNK, -1, True, b"chunked", b"Transfer-Encoding: chunked\r\n", False),
        (Body.DECHUNK, -1, True, b"chunked", b"", False),
        (Body.WRAP, -1, False, b"", b"Transfer-Encoding: chunked\r\n", True),
        (Body.WRAP, -1, False, b"gzip", b"Transfer-Encoding: gzip, chunked\r\n", True),
        (Body.RAW, -1, False, b"gzip", b"", True),  # close-delimited to an HTTP/1.0 client
        (Body.RAW, -1, False, b"", b"", True),
        (Body.NONE, -1, False, b"", b"", False),
        (Body.NONE, -1, True, b"chunked", b"", False),
    ],
)
def test_response_framing(
    body: Body, length: int, chunked: bool, codings: bytes, field: bytes, close_delimited: bool
) -> None:
    assert response_framing_field(body, chunked, codings) == field
    assert is_close_delimited(body, length, chunked) is close_delimited


@pytest.mark.parametrize(
    ("length", "chunked", "want", "field"),
    [
        (-1, False, RequestBody.NONE, b"Content-Length: 0"),
        (0, False, RequestBody.NONE, b"Content-Length: 0"),
        (7, False, RequestBody.LENGTH, b"Content-Length: 7"),
        (-1, True, RequestBody.CHUNKED, b"Transfer-Encoding: chunked"),
    ],
)
def test_request_body(length: int, chunked: bool, want: RequestBody, field: bytes) -> None:
    assert request_body(length, chunked) is want
    assert request_framing_field(want, length) == field


def test_request_head() -> None:
    fields = b"Accept: */*\r\n"
    assert request_head(b"GET", b"/a?b", b"h:8", fields, b"", False) == (
        b"GET /a?b HTTP/1.1\r\nHost: h:8\r\nAccept: */*\r\n\r\n"
    )
    assert request_head(b"POST", b"/", b"h", b"", b"gzip, chunked", False) == (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    )
    assert request_head(b"GET", b"/ws", b"h", b"Upgrade: websocket\r\n", b"", True) == (
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )


def test_response_heads() -> None:
    line, fields = b"HTTP/1.1 200 OK", b"A: b\r\n"
    framing = b"Transfer-Encoding: chunked\r\n"
    assert response_head(line, fields, framing, True) == (
        b"HTTP/1.1 200 OK\r\nA: b\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
    )
    assert response_head(line, fields, b"", False) == (
        b"HTTP/1.1 200 OK\r\nA: b\r\nConnection: close\r\n\r\n"
    )
    assert interim_head(b"HTTP/1.1 100 Continue", b"", False) == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert interim_head(b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket\r\n", True) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )


def test_chunks() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert chunk_size_line(4096) == b"1000\r\n"
    assert last_chunk([]) == END_CHUNKED == b"0\r\n\r\n"
    assert last_chunk([(b"Checksum", b"abc"), (b"X", b"")]) == (
        b"0\r\nChecksum: abc\r\nX: \r\n\r\n"
    )


class _Collect:
    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete += 1


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)
_value = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ;=", max_size=20).map(
    lambda v: v.strip().encode()
)


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    trailers=st.lists(st.tuples(_token, _value), max_size=3),
    split=st.integers(min_value=1, max_value=64),
)
def test_chunked_request_parses_back(
    pieces: list[bytes], trailers: list[tuple[bytes, bytes]], split: int
) -> None:
    """What the forwarder writes upstream, parsed by llhttp fed in any slices, is what it read."""
    head = request_head(b"POST", b"/", b"origin", b"", b"chunked", False)
    wire = head + b"".join(chunk(p) for p in pieces) + last_chunk(trailers)
    got = _Collect()
    parser = httptools.HttpRequestParser(got)
    for i in range(0, len(wire), split):
        parser.feed_data(wire[i : i + split])
    assert got.complete == 1
    assert b"".join(got.body) == b"".join(pieces)
    assert got.headers[2:] == trailers  # after Host and Transfer-Encoding: the trailers
