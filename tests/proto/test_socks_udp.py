"""proxytap.proto.socks, UDP ASSOCIATE: the request, the datagram header; tables and fuzzing."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.errors import ProtocolError
from proxytap.proto.socks import (
    NEED_DATA,
    NO_AUTH,
    USERPASS,
    AuthRequest,
    ConnectRequest,
    SocksServer,
    UdpAssociateRequest,
    UdpDatagram,
    parse_udp_datagram,
    udp_header,
)

FUZZ = settings(max_examples=400, deadline=None)
GREET = b"\x05\x01\x00"


def request(atyp: int, addr: bytes, port: int, cmd: int = 3) -> bytes:
    return bytes((5, cmd, 0, atyp)) + addr + struct.pack("!H", port)


def associate(data: bytes, **kw: object) -> tuple[object, bytes, SocksServer]:
    """Feed ``data`` to a server that accepts UDP ASSOCIATE: (event, wire, server)."""
    server = SocksServer(udp_associate=True, **kw)  # type: ignore[arg-type]
    server.receive_data(data)
    event = server.next_event()
    return event, server.data_to_send(), server


# -- the request ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected", "unspecified"),
    [
        pytest.param(
            request(1, bytes(4), 0), UdpAssociateRequest("0.0.0.0", 0, "ipv4"), True, id="zeros"
        ),
        pytest.param(
            request(1, bytes([127, 0, 0, 1]), 40000),
            UdpAssociateRequest("127.0.0.1", 40000, "ipv4"),
            False,
            id="ipv4-and-port",
        ),
        pytest.param(
            request(4, bytes(16), 0), UdpAssociateRequest("::", 0, "ipv6"), True, id="ipv6-zeros"
        ),
        pytest.param(
            request(4, ipaddress.IPv6Address("2001:db8::7").packed, 5353),
            UdpAssociateRequest("2001:db8::7", 5353, "ipv6"),
            False,
            id="ipv6",
        ),
        pytest.param(
            request(3, b"\x0bexample.com", 0),
            UdpAssociateRequest("example.com", 0, "domain"),
            True,
            id="domain-means-unspecified",
        ),
    ],
)
def test_udp_associate_request(
    data: bytes, expected: UdpAssociateRequest, unspecified: bool
) -> None:
    event, wire, server = associate(GREET + data + b"early")
    assert event == expected
    assert isinstance(event, UdpAssociateRequest)
    assert event.unspecified is unspecified and event.protocol == "socks5"
    assert wire == b"\x05\x00"
    assert server.complete and server.request == expected
    assert server.trailing_data() == b"early"  # bytes after the request: the shell ends it
    # the reply names the relay (BND.ADDR/BND.PORT)
    assert server.reply(0, ("127.0.0.1", 40000)) == b"\x05\x00\x00\x01\x7f\x00\x00\x01\x9c\x40"


def test_udp_associate_is_refused_unless_enabled() -> None:
    server = SocksServer()
    server.receive_data(GREET + request(1, bytes(4), 0))
    with pytest.raises(ProtocolError) as exc:
        server.next_event()
    assert exc.value.socks_code == 0x07
    assert exc.value.reply == b"\x05\x00" + b"\x05\x07\x00\x01" + bytes(6)


def test_bind_is_refused_with_udp_enabled() -> None:
    with pytest.raises(ProtocolError) as exc:
        associate(GREET + request(1, bytes(4), 80, cmd=2))
    assert exc.value.socks_code == 0x07


def test_udp_associate_after_authentication() -> None:
    server = SocksServer(methods=(USERPASS,), udp_associate=True)
    server.receive_data(b"\x05\x01\x02" + b"\x01\x01u\x01p")
    auth = server.next_event()
    assert isinstance(auth, AuthRequest) and auth.username == "u"
    server.auth_result(True)
    server.receive_data(request(1, bytes(4), 0))
    assert server.next_event() == UdpAssociateRequest("0.0.0.0", 0, "ipv4")
    assert server.data_to_send() == b"\x05\x02\x01\x00"


def test_udp_associate_bad_domain_and_atyp() -> None:
    with pytest.raises(ProtocolError) as exc:
        associate(GREET + request(3, b"\x03a b", 0))
    assert exc.value.socks_code == 0x04
    with pytest.raises(ProtocolError) as exc:
        associate(GREET + request(2, b"", 0))
    assert exc.value.socks_code == 0x08


def test_connect_still_parses_with_udp_enabled() -> None:
    event, _, _ = associate(GREET + request(1, bytes([10, 0, 0, 1]), 80, cmd=1))
    assert event == ConnectRequest(5, "10.0.0.1", 80, "ipv4")


# -- the datagram header ------------------------------------------------------------------------

V6 = ipaddress.IPv6Address("2001:db8::53").packed

DATAGRAMS = [
    pytest.param(
        b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35query",
        UdpDatagram(0, "127.0.0.1", 53, "ipv4", b"query"),
        id="ipv4",
    ),
    pytest.param(
        b"\x00\x00\x00\x04" + V6 + b"\x14\xe9",
        UdpDatagram(0, "2001:db8::53", 5353, "ipv6", b""),
        id="ipv6-empty-payload",
    ),
    pytest.param(
        b"\x00\x00\x00\x03\x0bExample.COM\x00\x35q",
        UdpDatagram(0, "example.com", 53, "domain", b"q"),
        id="domain-normalised",
    ),
    pytest.param(
        b"\x00\x00\x00\x03\x071.2.3.4\x00\x35q",
        UdpDatagram(0, "1.2.3.4", 53, "ipv4", b"q"),
        id="domain-that-is-an-address",
    ),
    pytest.param(
        b"\x00\x00\x02\x01\x7f\x00\x00\x01\x00\x35frag",
        UdpDatagram(2, "127.0.0.1", 53, "ipv4", b"frag"),
        id="fragment-returned-not-judged",
    ),
    pytest.param(
        b"\xff\xff\x00\x01\x7f\x00\x00\x01\x00\x35x",
        UdpDatagram(0, "127.0.0.1", 53, "ipv4", b"x"),
        id="rsv-not-checked",
    ),
]


@pytest.mark.parametrize(("data", "expected"), DATAGRAMS)
def test_parse_udp_datagram(data: bytes, expected: UdpDatagram) -> None:
    assert parse_udp_datagram(data) == expected
    assert parse_udp_datagram(bytearray(data)) == expected
    assert parse_udp_datagram(memoryview(data)) == expected


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x00\x00", id="three-bytes"),
        pytest.param(b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00", id="port-cut"),
        pytest.param(b"\x00\x00\x00\x04" + V6[:8], id="ipv6-cut"),
        pytest.param(b"\x00\x00\x00\x03", id="no-name-length"),
        pytest.param(b"\x00\x00\x00\x03\x05ab\x00\x35", id="name-cut"),
        pytest.param(b"\x00\x00\x00\x03\x00\x00\x35", id="empty-name"),
        pytest.param(b"\x00\x00\x00\x03\x03a b\x00\x35", id="bad-name"),
        pytest.param(b"\x00\x00\x00\x02\x7f\x00\x00\x01\x00\x35", id="atyp-2"),
        pytest.param(b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x00x", id="port-0"),
    ],
)
def test_parse_udp_datagram_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_udp_datagram(data)
    assert exc.value.socks_code is None and exc.value.reply == b""


def test_udp_header_bytes() -> None:
    assert udp_header("10.0.0.1", 53) == b"\x00\x00\x00\x01\x0a\x00\x00\x01\x00\x35"
    assert udp_header("2001:db8::53", 5353) == b"\x00\x00\x00\x04" + V6 + b"\x14\xe9"
    assert udp_header("example.com", 53) == b"\x00\x00\x00\x03\x0bexample.com\x00\x35"
    assert udp_header("10.0.0.1", 53, frag=1)[2] == 1
    for bad in (("10.0.0.1", 65536), ("10.0.0.1", -1), ("a" * 256, 53), ("", 53)):
        with pytest.raises(ValueError):
            udp_header(*bad)


# -- fuzzing ----------------------------------------------------------------------------------

IPS = st.ip_addresses().map(str)
NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True)


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_any_datagram_parses_or_protocol_error(data: bytes) -> None:
    try:
        dg = parse_udp_datagram(data)
    except ProtocolError as exc:
        assert exc.socks_code is None
        return
    assert 1 <= dg.port <= 0xFFFF and 0 <= dg.frag <= 0xFF
    assert data.endswith(dg.data)


@FUZZ
@given(
    host=IPS | NAMES,
    port=st.integers(1, 0xFFFF),
    frag=st.integers(0, 0xFF),
    payload=st.binary(max_size=200),
)
def test_fuzz_header_round_trip(host: str, port: int, frag: int, payload: bytes) -> None:
    dg = parse_udp_datagram(udp_header(host, port, frag) + payload)
    assert (dg.port, dg.frag, dg.data) == (port, frag, payload)
    if dg.atyp != "domain":
        assert ipaddress.ip_address(dg.host) == ipaddress.ip_address(host)
    else:
        assert dg.host == host


@FUZZ
@given(
    tail=st.binary(max_size=300),
    prefix=st.sampled_from([b"", GREET, GREET + b"\x05\x03\x00", GREET + b"\x05\x03\x00\x03"]),
)
def test_fuzz_requests_with_udp_enabled(prefix: bytes, tail: bytes) -> None:
    """Any bytes: an event, NEED_DATA or a ProtocolError; one byte at a time alike."""
    data = prefix + tail

    def outcome(chunks: list[bytes]) -> object:
        server = SocksServer(methods=(NO_AUTH,), udp_associate=True)
        try:
            for chunk in chunks:
                server.receive_data(chunk)
                event = server.next_event()
                if event is not NEED_DATA:
                    return event
            return NEED_DATA
        except ProtocolError as exc:
            return (exc.reason, exc.socks_code, exc.reply)

    whole = outcome([data] if data else [])
    assert outcome([data[i : i + 1] for i in range(len(data))]) == whole
    if isinstance(whole, UdpAssociateRequest):
        assert 0 <= whole.port <= 0xFFFF
