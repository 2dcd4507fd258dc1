"""proxytap.proto.proxyproto: byte tables for v1 and v2 headers, and hypothesis fuzzing."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.proto.proxyproto import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    NEED_DATA,
    SIGNATURE_V2,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    v1_header,
    v2_header,
)

FUZZ = settings(max_examples=400, deadline=None)
EARLY = b"GET / HTTP/1.1\r\n\r\n"


def read(chunks: Iterable[bytes], *, eof: bool = False) -> tuple[ProxyHeader, bytes]:
    """Feed ``chunks``; the header and the bytes after it (raises ProxyHeaderError)."""
    reader = ProxyHeaderReader()
    header = None
    for chunk in chunks:
        reader.receive_data(chunk)
        event = reader.next_event()
        if event is not NEED_DATA:
            assert isinstance(event, ProxyHeader)
            header = event
    if eof:
        reader.receive_data(b"")
        event = reader.next_event()
        if event is not NEED_DATA:
            assert isinstance(event, ProxyHeader)
            header = event
    assert header is not None, "no header yet"
    return header, reader.trailing_data()


def whole_and_bytewise(data: bytes) -> tuple[ProxyHeader, bytes]:
    """The same header and trailing bytes whether ``data`` comes at once or byte by byte."""
    header, rest = read([data])
    one_by_one = read([data[i : i + 1] for i in range(len(data))])
    assert one_by_one == (header, rest)
    return header, rest


def error(data: bytes, *, eof: bool = False) -> ProxyHeaderError:
    with pytest.raises(ProxyHeaderError) as info:
        read([data], eof=eof)
    return info.value


# -- version 1 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "family", "source", "destination"),
    [
        (
            b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n",
            "tcp4",
            ("192.0.2.10", 56324),
            ("198.51.100.1", 443),
        ),
        (
            b"PROXY TCP6 2001:DB8::10 2001:db8:0:0::1 0 65535\r\n",
            "tcp6",
            ("2001:db8::10", 0),  # canonical text, as every endpoint in proxytap
            ("2001:db8::1", 65535),
        ),
        (b"PROXY TCP4 0.0.0.0 255.255.255.255 1 2\r\n", "tcp4", ("0.0.0.0", 1), None),
        (b"PROXY UNKNOWN\r\n", "unknown", None, None),
        (b"PROXY UNKNOWN what ever follows is ignored\r\n", "unknown", None, None),
    ],
)
def test_v1_headers(
    line: bytes,
    family: str,
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
) -> None:
    header, rest = whole_and_bytewise(line + EARLY)
    assert (header.version, header.command, header.family) == (1, "proxy", family)
    assert header.source == source
    if destination is not None:
        assert header.destination == destination
    assert header.length == len(line)
    assert rest == EARLY  # the client's own bytes, untouched


def test_v1_longest_line_is_107_bytes() -> None:
    v6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY UNKNOWN {v6} {v6} 65535 65535\r\n".encode()
    assert len(line) == MAX_V1_LENGTH
    header, _ = whole_and_bytewise(line)
    assert header.family == "unknown"
    longer = line[:-2] + b"0\r\n"
    assert "no CRLF within 107 bytes" in error(longer).reason
    # refused once 107 bytes are in without a CRLF, not after waiting for more
    assert "no CRLF" in error(b"PROXY UNKNOWN " + b"x" * 93).reason


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"PROXY TCP4  192.0.2.1 192.0.2.2 1 2\r\n", "fields after it"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", "fields after it"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 3\r\n", "fields after it"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n", "fields after it"),
        (b"PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n", "not an IPv4 address"),
        (b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", "not an IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n", "zone id"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 01 2\r\n", "leading zero"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 65536\r\n", "over 65535"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 2\r\n", "not a decimal number"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 +1 2\r\n", "not a decimal number"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 123456 2\r\n", "not a decimal number"),
        (b"PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n", "none of TCP4"),
        (b"PROXY tcp4 192.0.2.1 192.0.2.2 1 2\r\n", "none of TCP4"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", "LF without CR"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\r\n", "ASCII"),
        (b"PROXY TCP4 192.0.2.1 192.0.2.\xb2 1 2\r\n", "ASCII"),
        (b"PROXY\r\n", "'PROXY '"),
        (b"proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n", "not a PROXY header"),
        (b"PROXX TCP4", "'PROXY '"),
    ],
)
def test_v1_malformed(line: bytes, why: str) -> None:
    exc = error(line + EARLY)
    assert why in exc.reason, exc.reason
    assert not exc.closed


# -- version 2 ---------------------------------------------------------------------------


def v2(command: int, family: int, block: bytes, version: int = 2) -> bytes:
    return (
        SIGNATURE_V2
        + bytes((version << 4 | command, family))
        + struct.pack(">H", len(block))
        + block
    )


TCP4_BLOCK = bytes([192, 0, 2, 10, 198, 51, 100, 1]) + struct.pack(">HH", 56324, 443)
TCP6_BLOCK = (
    ipaddress.IPv6Address("2001:db8::10").packed
    + ipaddress.IPv6Address("2001:db8::1").packed
    + struct.pack(">HH", 40000, 1080)
)


@pytest.mark.parametrize(
    ("data", "family", "source", "destination", "tlvs"),
    [
        (v2(1, 0x11, TCP4_BLOCK), "tcp4", ("192.0.2.10", 56324), ("198.51.100.1", 443), ()),
        (v2(1, 0x21, TCP6_BLOCK), "tcp6", ("2001:db8::10", 40000), ("2001:db8::1", 1080), ()),
        (
            # ALPN and authority TLVs, then an empty NOOP: kept, otherwise ignored
            v2(1, 0x11, TCP4_BLOCK + b"\x01\x00\x02h2\x02\x00\x09localhost\x04\x00\x00"),
            "tcp4",
            ("192.0.2.10", 56324),
            ("198.51.100.1", 443),
            ((0x01, b"h2"), (0x02, b"localhost"), (0x04, b"")),
        ),
        (v2(1, 0x00, b""), "unspec", None, None, ()),
        (v2(1, 0x00, b"anything"), "unspec", None, None, ()),
        # defined, but not TCP: the specification's fallback to the connection's endpoints
        (v2(1, 0x12, TCP4_BLOCK), "udp4", None, None, ()),
        (v2(1, 0x22, TCP6_BLOCK), "udp6", None, None, ()),
        (v2(1, 0x31, b"/run/client.sock".ljust(216, b"\0")), "unix", None, None, ()),
        (v2(1, 0x32, bytes(216)), "unix-dgram", None, None, ()),
    ],
)
def test_v2_proxy(
    data: bytes,
    family: str,
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    tlvs: tuple[tuple[int, bytes], ...],
) -> None:
    header, rest = whole_and_bytewise(data + EARLY)
    assert (header.version, header.command, header.family) == (2, "proxy", family)
    assert (header.source, header.destination, header.tlvs) == (source, destination, tlvs)
    assert header.length == len(data)
    assert rest == EARLY


@pytest.mark.parametrize("family", [0x00, 0x11, 0x21, 0x13, 0xFF])
def test_v2_local_discards_the_block_family_included(family: int) -> None:
    header, rest = whole_and_bytewise(v2(0, family, b"health check \x00\xff") + EARLY)
    assert (header.command, header.source, header.destination) == ("local", None, None)
    assert rest == EARLY


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4), "bad signature"),
        (b"\r\n\r\n\x01", "bad signature"),
        (v2(1, 0x11, TCP4_BLOCK, version=1), "version 1, not 2"),
        (v2(1, 0x11, TCP4_BLOCK, version=3), "version 3, not 2"),
        (v2(2, 0x11, TCP4_BLOCK), "neither LOCAL nor PROXY"),
        (v2(0xF, 0x11, TCP4_BLOCK), "neither LOCAL nor PROXY"),
        (v2(1, 0x13, TCP4_BLOCK), "0x13 are not defined"),
        (v2(1, 0x01, TCP4_BLOCK), "0x01 are not defined"),
        (v2(1, 0x41, TCP4_BLOCK), "0x41 are not defined"),
        (v2(1, 0x11, TCP4_BLOCK[:11]), "tcp4 needs 12 bytes"),
        (v2(1, 0x21, TCP6_BLOCK[:35] + TCP4_BLOCK[:0]), "tcp6 needs 36 bytes"),
        (v2(1, 0x31, bytes(215)), "unix needs 216 bytes"),
        (v2(1, 0x11, TCP4_BLOCK + b"\x01\x00"), "too few for one"),
        (v2(1, 0x11, TCP4_BLOCK + b"\x01\x00\x05abc"), "runs past the header"),
    ],
)
def test_v2_malformed(data: bytes, why: str) -> None:
    exc = error(data + EARLY)
    assert why in exc.reason, exc.reason
    assert not exc.closed


def test_v2_length_is_bounded_before_the_block_arrives() -> None:
    fixed = SIGNATURE_V2 + b"\x21\x11" + struct.pack(">H", MAX_V2_LENGTH + 1)
    assert f"over {MAX_V2_LENGTH}" in error(fixed).reason  # refused from the 16 bytes alone
    # the longest allowed header is read whole
    tlv = b"\xe0" + struct.pack(">H", MAX_V2_LENGTH - len(TCP4_BLOCK) - 3)
    data = v2(1, 0x11, TCP4_BLOCK + tlv + bytes(MAX_V2_LENGTH - len(TCP4_BLOCK) - 3))
    header, _ = read([data])
    assert header.length == 16 + MAX_V2_LENGTH and header.tlvs[0][0] == 0xE0


# -- framing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first", [b"G", b"C", b"\x05", b"\x04", b"\x16", b"\x00", b"p", b"\n", b"\r\r"]
)
def test_other_protocols_fail_on_their_first_bytes(first: bytes) -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(first)
    with pytest.raises(ProxyHeaderError):
        reader.next_event()
    with pytest.raises(ProxyHeaderError):  # and stays failed
        reader.next_event()


@pytest.mark.parametrize(
    "partial",
    [b"", b"PROXY TCP4 192.0.2.1", v2(1, 0x11, TCP4_BLOCK)[:20], SIGNATURE_V2[:5]],
)
def test_eof_before_the_header_is_whole_is_closed_not_malformed(partial: bytes) -> None:
    exc = error(partial, eof=True)
    assert exc.closed
    assert "closed" in exc.reason


def test_bytes_after_the_header_arrive_later_too() -> None:
    reader = ProxyHeaderReader()
    reader.receive_data(b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\nab")
    assert isinstance(reader.next_event(), ProxyHeader)
    reader.receive_data(b"cd")
    assert reader.trailing_data() == b"abcd"
    assert reader.trailing_data() == b""
    assert reader.complete


# -- writers and readers agree; any input parses or fails cleanly ---------------------


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


def _endpoints(addrs: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, int]]:
    return st.tuples(addrs, ports)


same_family = st.one_of(
    st.tuples(_endpoints(ipv4), _endpoints(ipv4)), st.tuples(_endpoints(ipv6), _endpoints(ipv6))
)


@FUZZ
@given(same_family, st.binary(max_size=64), st.integers(1, 40), st.booleans())
def test_written_headers_read_back(
    pair: tuple[tuple[str, int], tuple[str, int]], early: bytes, step: int, binary: bool
) -> None:
    src, dst = pair
    data = (v2_header(src, dst) if binary else v1_header(src, dst)) + early
    header, rest = read([data[i : i + step] for i in range(0, len(data), step)])
    assert header.source is not None and header.destination is not None
    got = [(ipaddress.ip_address(a), p) for a, p in (header.source, header.destination)]
    assert got == [(ipaddress.ip_address(a), p) for a, p in (src, dst)]
    assert header.version == (2 if binary else 1)
    assert rest == early


def _outcome(chunks: list[bytes]) -> tuple[str, object]:
    reader = ProxyHeaderReader()
    try:
        for chunk in chunks:
            reader.receive_data(chunk)
            event = reader.next_event()
            if event is not NEED_DATA:
                return "header", event
        reader.receive_data(b"")
        event = reader.next_event()
    except ProxyHeaderError as exc:
        return "error", exc.closed
    raise AssertionError(f"EOF gave {event!r}, not an error")


prefixes = st.sampled_from(
    [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", SIGNATURE_V2,
     SIGNATURE_V2 + b"\x21\x11", SIGNATURE_V2 + b"\x20", SIGNATURE_V2 + b"\x21\x21\x00\x24"]
)  # fmt: skip


@FUZZ
@given(prefixes, st.binary(max_size=300))
def test_any_input_parses_or_fails_with_proxy_header_error(prefix: bytes, tail: bytes) -> None:
    data = prefix + tail
    whole = _outcome([data])
    bytewise = _outcome([data[i : i + 1] for i in range(len(data))])
    # the same verdict whatever the split: the same header, or an error either way
    if whole[0] == "header":
        assert bytewise == whole
    else:
        assert bytewise[0] == "error"
