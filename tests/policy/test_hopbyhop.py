"""Hop-by-hop header removal: byte tables, run as str and as bytes, and a property test
that the raw-block fast path agrees with the field-list function."""

from __future__ import annotations

import pytest

from proxytap.policy.hopbyhop import (
    connection_tokens,
    has_token,
    header_values,
    is_websocket_upgrade,
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
