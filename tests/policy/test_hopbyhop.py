"""Hop-by-hop header removal: byte tables, run as str and as bytes, and a property test
that the raw-block fast path agrees with the field-list function."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxytap.policy.hopbyhop import (
    HOP_BY_HOP,
    connection_tokens,
    has_token,
    header_values,
    is_websocket_upgrade,
    strip_block,
    strip_hop_by_hop,
)

H = list[tuple[str, str]]

STRIP_CASES: list[tuple[str, H, bool, H]] = [
    ("empty", [], False, []),
    (
        "end to end kept",
        [("Host", "a"), ("Accept", "*/*")],
        False,
        [("Host", "a"), ("Accept", "*/*")],
    ),
    (
        "the fixed set, any case",
        [
            ("CONNECTION", "keep-alive"),
            ("Proxy-Connection", "Keep-Alive"),
            ("keep-alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "X-Sum"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic dTpw"),
            ("Proxy-Authenticate", "Basic"),
            ("X-Kept", "1"),
        ],
        False,
        [("X-Kept", "1")],
    ),
    (
        "names listed in Connection go too",
        [("Connection", "X-Secret, close"), ("x-secret", "s"), ("X-Other", "o")],
        False,
        [("X-Other", "o")],
    ),
    (
        "and in Proxy-Connection",
        [("Proxy-Connection", "X-A"), ("X-A", "1"), ("X-B", "2")],
        False,
        [("X-B", "2")],
    ),
    (
        "several Connection fields, OWS",
        [("Connection", " X-A ,"), ("Connection", ",X-B\t"), ("X-A", "1"), ("X-B", "2")],
        False,
        [],
    ),
    (
        "a field named after a connection option goes (RFC 9110 section 7.6.1)",
        [("Close", "x"), ("Connection", "close"), ("X", "y")],
        False,
        [("X", "y")],
    ),
    (
        "Connection cannot remove framing or routing",
        [("Connection", "Content-Length, Host"), ("Host", "h"), ("Content-Length", "3")],
        False,
        [("Host", "h"), ("Content-Length", "3")],
    ),
    (
        "a WebSocket upgrade keeps Upgrade, not Connection",
        [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Key", "k")],
        True,
        [("Upgrade", "websocket"), ("Sec-WebSocket-Key", "k")],
    ),
    (
        "order and duplicates of kept fields unchanged",
        [("B", "1"), ("TE", "x"), ("A", "2"), ("B", "3")],
        False,
        [("B", "1"), ("A", "2"), ("B", "3")],
    ),
]


def _b(headers: H) -> list[tuple[bytes, bytes]]:
    return [(n.encode(), v.encode()) for n, v in headers]


@pytest.mark.parametrize(("name", "headers", "keep", "expected"), STRIP_CASES)
@pytest.mark.parametrize("kind", ["str", "bytes"])
def test_strip_hop_by_hop(name: str, headers: H, keep: bool, expected: H, kind: str) -> None:
    if kind == "str":
        assert strip_hop_by_hop(headers, keep_upgrade=keep) == expected
    else:
        assert strip_hop_by_hop(_b(headers), keep_upgrade=keep) == _b(expected)
    assert strip_hop_by_hop(headers, keep_upgrade=keep) is not headers


def _block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"".join(b"\r\n" + n + b": " + v for n, v in headers) + b"\r\n\r\n"


@pytest.mark.parametrize(("name", "headers", "keep", "expected"), STRIP_CASES)
def test_strip_block_table(name: str, headers: H, keep: bool, expected: H) -> None:
    block, removed = strip_block(_block(_b(headers)), keep_upgrade=keep)
    assert block == _block(_b(expected))
    assert len(removed) == len(headers) - len(expected)


def test_strip_block_returns_removed_values_without_ows() -> None:
    block = b"\r\nA: 1\r\nTransfer-Encoding:  gzip, chunked \t\r\nB:2\r\n\r\n"
    out, removed = strip_block(block)
    assert out == b"\r\nA: 1\r\nB:2\r\n\r\n"
    assert removed == [(b"Transfer-Encoding", b"gzip, chunked")]
    assert strip_block(b"\r\n\r\n") == (b"\r\n\r\n", [])
    # a name that only starts like a hop-by-hop one is kept
    assert strip_block(b"\r\nTE-Extra: 1\r\nUpgraded: 2\r\n\r\n")[1] == []


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], set()),
        ([("Connection", "Keep-Alive, Upgrade")], {"keep-alive", "upgrade"}),
        ([("Connection", " ,a,,B ")], {"a", "b"}),
        ([("Proxy-Connection", "close"), ("Connection", "x")], {"close", "x"}),
        ([("X-Connection", "nope")], set()),
    ],
)
def test_connection_tokens(headers: H, expected: set[str]) -> None:
    assert connection_tokens(headers) == expected
    assert connection_tokens(_b(headers)) == {t.encode() for t in expected}


@pytest.mark.parametrize(
    ("headers", "websocket"),
    [
        ([("Connection", "Upgrade"), ("Upgrade", "websocket")], True),
        ([("connection", "keep-alive, upgrade"), ("upgrade", "WebSocket")], True),
        ([("Upgrade", "websocket")], False),
        ([("Connection", "Upgrade"), ("Upgrade", "h2c")], False),
        ([("Connection", "Upgrade"), ("Upgrade", "h2c, websocket")], True),
        ([], False),
    ],
)
def test_is_websocket_upgrade(headers: H, websocket: bool) -> None:
    assert is_websocket_upgrade(headers) is websocket
    assert is_websocket_upgrade(_b(headers)) is websocket


def test_has_token_and_values() -> None:
    headers = [("Expect", "100-continue"), ("Accept", "a"), ("accept", "b")]
    assert has_token(headers, "expect", "100-Continue")
    assert not has_token(headers, "expect", "100")
    assert has_token(_b(headers), b"EXPECT", b"100-continue")
    assert header_values(headers, "ACCEPT") == ["a", "b"]
    assert header_values(_b(headers), b"accept") == [b"a", b"b"]


# -- the raw block agrees with the field list, for any headers ----------------------------------

_NAMES = st.sampled_from(
    [*HOP_BY_HOP, "Host", "Content-Length", "X-A", "X-B", "Accept", "te-x", "close"]
).flatmap(lambda n: st.sampled_from([n, n.upper(), n.title()])) | st.from_regex(
    r"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True
)
_TOKENS = st.sampled_from(["close", "keep-alive", "upgrade", "x-a", "X-B", "host", "te", "a b"])
_VALUES = st.lists(_TOKENS, max_size=3).map(", ".join) | st.from_regex(
    r"[ -~]{0,20}", fullmatch=True
).map(str.strip)


@given(
    headers=st.lists(st.tuples(_NAMES, _VALUES), max_size=12),
    keep=st.booleans(),
)
def test_strip_block_matches_strip_hop_by_hop(headers: list[tuple[str, str]], keep: bool) -> None:
    raw = _b(headers)
    expected = _block(strip_hop_by_hop(raw, keep_upgrade=keep))
    out, removed = strip_block(_block(raw), keep_upgrade=keep)
    assert out == expected
    assert len(removed) == len(raw) - len(strip_hop_by_hop(raw, keep_upgrade=keep))
