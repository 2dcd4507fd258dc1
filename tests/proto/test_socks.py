"""proxytap.proto.socks: byte tables for every reply, and hypothesis fuzzing."""

from __future__ import annotations

import ipaddress
import itertools
import socket
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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
)

FUZZ = settings(max_examples=400, deadline=None)

# -- a driver: feed chunks, answer auth, collect everything --------------------------


@dataclass
class Outcome:
    events: list[AuthRequest | ConnectRequest]
    wire: bytes  # everything the server sends: data_to_send() and the error reply
    error: tuple[str, int | None] | None  # (reason, socks_code)
    trailing: bytes


def drive(
    chunks: Iterable[bytes],
    methods: Sequence[int] = (NO_AUTH,),
    *,
    auth_ok: Callable[[AuthRequest], bool] = lambda _: True,
    eof: bool = True,
) -> Outcome:
    server = SocksServer(methods=methods)
    events: list[AuthRequest | ConnectRequest] = []
    wire = bytearray()
    error = None

    def pump() -> None:
        while not server.complete:
            event = server.next_event()
            wire.extend(server.data_to_send())
            if event is NEED_DATA:
                return
            assert isinstance(event, AuthRequest | ConnectRequest)
            events.append(event)
            if isinstance(event, AuthRequest):
                server.auth_result(auth_ok(event))
                wire.extend(server.data_to_send())

    try:
        for chunk in chunks:
            if not chunk:
                continue
            server.receive_data(chunk)
            pump()
        if eof and not server.complete:
            server.receive_data(b"")
            pump()
    except ProtocolError as exc:
        wire += exc.reply
        error = (exc.reason, exc.socks_code)
    trailing = server.trailing_data() if server.complete else b""
    return Outcome(events, bytes(wire), error, trailing)


def one_by_one(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def s5_request(atyp: int, addr: bytes, port: int, cmd: int = 1) -> bytes:
    return bytes((5, cmd, 0, atyp)) + addr + struct.pack("!H", port)


def s5_domain(name: bytes, port: int = 443, cmd: int = 1) -> bytes:
    return s5_request(3, bytes((len(name),)) + name, port, cmd)


def s5_error(code: int) -> bytes:
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


def s4_request(
    ip: str, port: int, user: bytes = b"", host: bytes | None = None, cd: int = 1
) -> bytes:
    data = struct.pack("!BBH", 4, cd, port) + socket.inet_aton(ip) + user + b"\x00"
    if host is not None:
        data += host + b"\x00"
    return data


GREET = b"\x05\x01\x00"
SEL_NO_AUTH = b"\x05\x00"
S4_REJECT = b"\x00\x5b\x00\x00\x00\x00\x00\x00"

# -- SOCKS5 successes ------------------------------------------------------------------

S5_OK = [
    pytest.param(
        s5_request(1, bytes([127, 0, 0, 1]), 80),
        ConnectRequest(5, "127.0.0.1", 80, "ipv4"),
        id="ipv4",
    ),
    pytest.param(
        s5_request(4, ipaddress.IPv6Address("2001:db8::1").packed, 443),
        ConnectRequest(5, "2001:db8::1", 443, "ipv6"),
        id="ipv6",
    ),
    pytest.param(
        s5_request(4, ipaddress.IPv6Address("::ffff:1.2.3.4").packed, 443),
        ConnectRequest(5, "::ffff:1.2.3.4", 443, "ipv6"),
        id="ipv6-mapped-inet_ntop-form",
    ),
    pytest.param(
        s5_domain(b"example.com"),
        ConnectRequest(5, "example.com", 443, "domain"),
        id="domain",
    ),
    pytest.param(
        s5_domain(b"WWW.Example.COM.", 8080),
        ConnectRequest(5, "www.example.com", 8080, "domain"),
        id="domain-lowercased-trailing-dot-dropped",
    ),
    pytest.param(
        s5_domain(b"_srv-1.xn--bcher-kva.example", 65535),
        ConnectRequest(5, "_srv-1.xn--bcher-kva.example", 65535, "domain"),
        id="domain-underscore-punycode",
    ),
    pytest.param(
        s5_domain(b"10.1.2.3"),
        ConnectRequest(5, "10.1.2.3", 443, "ipv4"),
        id="domain-ipv4-literal-normalised",
    ),
    pytest.param(
        s5_domain(b"2001:DB8:0:0::1"),
        ConnectRequest(5, "2001:db8::1", 443, "ipv6"),
        id="domain-ipv6-literal-normalised",
    ),
    pytest.param(
        s5_domain(b"a" * 63 + b"." + b"b" * 63 + b"." + b"c" * 63 + b"." + b"d" * 61),
        ConnectRequest(
            5, "a" * 63 + "." + "b" * 63 + "." + "c" * 63 + "." + "d" * 61, 443, "domain"
        ),
        id="domain-253-chars",
    ),
    pytest.param(
        b"\x05\x01\xff\x01" + bytes([10, 0, 0, 1]) + b"\x00\x16",
        ConnectRequest(5, "10.0.0.1", 22, "ipv4"),
        id="nonzero-rsv-tolerated",
    ),
]


@pytest.mark.parametrize(("request_bytes", "expected"), S5_OK)
def test_socks5_connect(request_bytes: bytes, expected: ConnectRequest) -> None:
    for chunks in ([GREET + request_bytes], one_by_one(GREET + request_bytes)):
        outcome = drive(chunks)
        assert outcome.error is None
        assert outcome.events == [expected]
        assert outcome.wire == SEL_NO_AUTH
        assert outcome.trailing == b""
    assert expected.protocol == "socks5"


def test_socks5_greeting_picks_server_preference() -> None:
    server = SocksServer(methods=(USERPASS, NO_AUTH))
    server.receive_data(b"\x05\x03\x01\x00\x02")
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == b"\x05\x02"
    assert server.selected_method == USERPASS

    server = SocksServer(methods=(NO_AUTH, USERPASS))
    server.receive_data(b"\x05\x03\x01\x00\x02")
    assert server.next_event() is NEED_DATA
    assert server.data_to_send() == b"\x05\x00"
    assert server.data_to_send() == b""  # drained


def test_socks5_reply_bytes() -> None:
    server = SocksServer()
    server.receive_data(GREET + s5_domain(b"example.com"))
    assert isinstance(server.next_event(), ConnectRequest)
    assert server.reply(0) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert server.reply(0, ("10.0.0.1", 4321)) == b"\x05\x00\x00\x01\x0a\x00\x00\x01\x10\xe1"
    assert server.reply(0, ("2001:db8::2", 443)) == (
        b"\x05\x00\x00\x04" + ipaddress.IPv6Address("2001:db8::2").packed + b"\x01\xbb"
    )
    assert server.reply(0x05) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
    assert server.reply(0x04, ("192.0.2.1", 1)) == b"\x05\x04\x00\x01\xc0\x00\x02\x01\x00\x01"
    with pytest.raises(ValueError):
        server.reply(256)
    with pytest.raises(ValueError):
        server.reply(0, ("example.com", 1))
    with pytest.raises(ValueError):
        server.reply(0, ("10.0.0.1", 65536))


# -- SOCKS5 failures: client bytes -> exact server bytes, code -----------------------

S5_ERRORS = [
    # (methods, client bytes, everything the server sends, socks_code)
    pytest.param((NO_AUTH,), b"\x06", b"", None, id="unknown-version"),
    pytest.param((NO_AUTH,), b"GET / HTTP/1.1\r\n", b"", None, id="http-on-socks-port"),
    pytest.param((NO_AUTH,), b"\x00", b"", None, id="version-zero"),
    pytest.param((NO_AUTH,), b"\x05\x00", b"\x05\xff", 0xFF, id="nmethods-zero"),
    pytest.param((NO_AUTH,), b"\x05\x01\x02", b"\x05\xff", 0xFF, id="only-userpass-offered"),
    pytest.param((NO_AUTH,), b"\x05\x02\x01\x80", b"\x05\xff", 0xFF, id="gssapi-private"),
    pytest.param((USERPASS,), GREET, b"\x05\xff", 0xFF, id="auth-required-not-offered"),
    pytest.param(
        (NO_AUTH,),
        GREET + b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        SEL_NO_AUTH + s5_error(0x01),
        0x01,
        id="request-version-4",
    ),
    pytest.param(
        (NO_AUTH,),
        GREET + s5_request(1, bytes(4), 80, cmd=2),
        SEL_NO_AUTH + s5_error(0x07),
        0x07,
        id="bind",
    ),
    pytest.param(
        (NO_AUTH,),
        GREET + s5_request(1, bytes(4), 80, cmd=3),
        SEL_NO_AUTH + s5_error(0x07),
        0x07,
        id="udp-associate",
    ),
    pytest.param(
        (NO_AUTH,), GREET + b"\x05\x00\x00\x01", SEL_NO_AUTH + s5_error(0x07), 0x07, id="cmd-0"
    ),
    pytest.param(
        (NO_AUTH,), GREET + b"\x05\xff\x00\x01", SEL_NO_AUTH + s5_error(0x07), 0x07, id="cmd-ff"
    ),
    pytest.param(
        (NO_AUTH,), GREET + b"\x05\x01\x00\x00", SEL_NO_AUTH + s5_error(0x08), 0x08, id="atyp-0"
    ),
    pytest.param(
        (NO_AUTH,), GREET + b"\x05\x01\x00\x02", SEL_NO_AUTH + s5_error(0x08), 0x08, id="atyp-2"
    ),
    pytest.param(
        (NO_AUTH,), GREET + b"\x05\x01\x00\x05", SEL_NO_AUTH + s5_error(0x08), 0x08, id="atyp-5"
    ),
    pytest.param(
        (NO_AUTH,),
        GREET + s5_request(1, bytes([10, 0, 0, 1]), 0),
        SEL_NO_AUTH + s5_error(0x01),
        0x01,
        id="port-0",
    ),
    pytest.param(
        (NO_AUTH,),
        GREET + s5_request(4, bytes(15) + b"\x01", 0),
        SEL_NO_AUTH + s5_error(0x01),
        0x01,
        id="ipv6-port-0",
    ),
    pytest.param(
        (NO_AUTH,),
        GREET + s5_domain(b"example.com", 0),
        SEL_NO_AUTH + s5_error(0x01),
        0x01,
        id="domain-port-0",
    ),
    pytest.param(
        (USERPASS,),
        b"\x05\x01\x02\x05\x03bob\x03pwd",
        b"\x05\x02\x01\x01",
        0x01,
        id="auth-version-5",
    ),
    pytest.param(
        (USERPASS,),
        b"\x05\x01\x02\x00\x03bob\x03pwd",
        b"\x05\x02\x01\x01",
        0x01,
        id="auth-version-0",
    ),
]


@pytest.mark.parametrize(("methods", "data", "wire", "code"), S5_ERRORS)
def test_socks5_errors(
    methods: tuple[int, ...], data: bytes, wire: bytes, code: int | None
) -> None:
    for chunks in ([data], one_by_one(data)):
        outcome = drive(chunks, methods)
        assert outcome.error is not None
        assert outcome.error[1] == code
        assert outcome.wire == wire
        assert outcome.events == []


BAD_NAMES = [
    b"",
    b".",
    b"exa mple.com",
    b"a,b.example",
    b"a\x00b",
    b"a\tb",
    b"a\r\nb",
    b"a/b",
    b"user@host",
    b"ex%41mple.com",
    b"\xc3\xa9t\xc3\xa9.example",
    b"a..b",
    b".a",
    b"a.b..",
    b"x" * 64 + b".com",
    (b"a" * 63 + b".") * 3 + b"a" * 62,  # 254 characters
    b"127.1",
    b"0x7f000001",
    b"0x7f.1",
    b"010.0.0.1",
    b"2130706433",
    b"fe80::1%eth0",
    b"[::1]",
    b"1:2:3",
    b"::g",
    b"*.example",
]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_socks5_bad_domain_is_host_unreachable(name: bytes) -> None:
    outcome = drive([GREET + s5_domain(name)])
    assert outcome.error == ("invalid SOCKS5 domain name", 0x04)
    assert outcome.wire == SEL_NO_AUTH + s5_error(0x04)


@pytest.mark.parametrize("name", [n for n in BAD_NAMES if b"\x00" not in n], ids=repr)
def test_socks4a_bad_hostname_is_rejected(name: bytes) -> None:
    outcome = drive([s4_request("0.0.0.1", 80, b"u", name)])
    assert outcome.error == ("invalid SOCKS4a hostname", 0x5B)
    assert outcome.wire == S4_REJECT


def test_socks5_userpass_success() -> None:
    data = (
        b"\x05\x02\x00\x02"
        + b"\x01\x05alice\x06s3cr\xe9t"
        + s5_domain(b"example.org", 443)
        + b"early bytes"
    )
    for chunks in ([data], one_by_one(data)):
        outcome = drive(chunks, (USERPASS, NO_AUTH))
        assert outcome.error is None
        assert outcome.events == [
            AuthRequest("alice", "s3cr\xe9t"),
            ConnectRequest(5, "example.org", 443, "domain"),
        ]
        assert outcome.wire == b"\x05\x02\x01\x00"
        assert outcome.trailing == b"early bytes"


def test_socks5_userpass_empty_fields() -> None:
    outcome = drive([b"\x05\x01\x02\x01\x00\x00" + s5_domain(b"a.example")], (USERPASS,))
    assert outcome.events[0] == AuthRequest("", "")
    assert outcome.error is None


def test_socks5_userpass_max_lengths_keep_every_byte() -> None:
    user = bytes(range(1, 256))
    password = bytes(range(255, 0, -1))
    data = b"\x05\x01\x02\x01\xff" + user + b"\xff" + password + s5_domain(b"a.example")
    outcome = drive(one_by_one(data), (USERPASS,))
    assert outcome.events[0] == AuthRequest(user.decode("latin-1"), password.decode("latin-1"))


def test_socks5_userpass_failure_reply_either_queued_or_in_error() -> None:
    data = b"\x05\x01\x02\x01\x03bob\x03bad" + s5_domain(b"a.example")
    # Caller drains data_to_send() after auth_result(): the error carries no reply.
    server = SocksServer(methods=(USERPASS,))
    server.receive_data(data)
    assert server.next_event() == AuthRequest("bob", "bad")
    assert server.data_to_send() == b"\x05\x02"
    server.auth_result(False)
    assert server.data_to_send() == b"\x01\x01"
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.reply == b""
    assert info.value.socks_code == 0x01
    # Caller does not drain: the status moves into the error's reply, sent once.
    server = SocksServer(methods=(USERPASS,))
    server.receive_data(data)
    assert isinstance(server.next_event(), AuthRequest)
    server.auth_result(False)
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.reply == b"\x05\x02\x01\x01"
    assert server.data_to_send() == b""


def test_auth_request_repr_hides_password() -> None:
    assert "hunter2" not in repr(AuthRequest("bob", "hunter2"))


def test_undrained_method_selection_precedes_error_reply() -> None:
    server = SocksServer()
    server.receive_data(GREET + s5_request(1, bytes(4), 80, cmd=2))
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.reply == SEL_NO_AUTH + s5_error(0x07)
    assert info.value.socks_code == 0x07


# -- SOCKS4 / 4a ---------------------------------------------------------------------

S4_OK = [
    pytest.param(
        s4_request("127.0.0.1", 80, b"fred"),
        ConnectRequest(4, "127.0.0.1", 80, "ipv4", b"fred"),
        "socks4",
        id="socks4",
    ),
    pytest.param(
        s4_request("192.0.2.7", 443),
        ConnectRequest(4, "192.0.2.7", 443, "ipv4"),
        "socks4",
        id="socks4-empty-userid",
    ),
    pytest.param(
        s4_request("0.0.0.0", 443),
        ConnectRequest(4, "0.0.0.0", 443, "ipv4"),
        "socks4",
        id="socks4-0.0.0.0-is-not-4a",
    ),
    pytest.param(
        s4_request("0.0.0.1", 443, b"u\xff", b"Example.COM"),
        ConnectRequest(4, "example.com", 443, "domain", b"u\xff"),
        "socks4a",
        id="socks4a",
    ),
    pytest.param(
        s4_request("0.0.0.255", 8080, b"", b"10.9.8.7"),
        ConnectRequest(4, "10.9.8.7", 8080, "ipv4"),
        "socks4",
        id="socks4a-ipv4-literal",
    ),
    pytest.param(
        s4_request("0.0.0.1", 80, b"x" * 255, b"h" * 63),
        ConnectRequest(4, "h" * 63, 80, "domain", b"x" * 255),
        "socks4a",
        id="socks4a-max-userid",
    ),
]


@pytest.mark.parametrize(("data", "expected", "protocol"), S4_OK)
def test_socks4_connect(data: bytes, expected: ConnectRequest, protocol: str) -> None:
    for chunks in ([data + b"EARLY"], [*one_by_one(data), b"EARLY"]):
        outcome = drive(chunks)
        assert outcome.error is None
        assert outcome.events == [expected]
        assert outcome.wire == b""
        assert outcome.trailing == b"EARLY"
    assert expected.protocol == protocol


def test_socks4_reply_bytes() -> None:
    server = SocksServer()
    server.receive_data(s4_request("127.0.0.1", 80))
    assert isinstance(server.next_event(), ConnectRequest)
    assert server.reply(0) == b"\x00\x5a\x00\x00\x00\x00\x00\x00"
    assert server.reply(0, ("10.0.0.1", 4321)) == b"\x00\x5a\x10\xe1\x0a\x00\x00\x01"
    assert server.reply(0x5A, ("10.0.0.1", 4321)) == b"\x00\x5a\x10\xe1\x0a\x00\x00\x01"
    assert server.reply(0, ("2001:db8::1", 4321)) == b"\x00\x5a\x10\xe1\x00\x00\x00\x00"
    for code in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0xFF):
        assert server.reply(code) == S4_REJECT
    assert server.reply(0x5C) == b"\x00\x5c\x00\x00\x00\x00\x00\x00"
    assert server.reply(0x5D) == b"\x00\x5d\x00\x00\x00\x00\x00\x00"


S4_ERRORS = [
    pytest.param((NO_AUTH,), s4_request("127.0.0.1", 80, cd=2), id="bind"),
    pytest.param((NO_AUTH,), s4_request("127.0.0.1", 80, cd=0), id="cd-0"),
    pytest.param((NO_AUTH,), s4_request("127.0.0.1", 80, cd=3), id="cd-3"),
    pytest.param((NO_AUTH,), s4_request("127.0.0.1", 0), id="port-0"),
    pytest.param((NO_AUTH,), s4_request("0.0.0.1", 0, b"", b"example.com"), id="4a-port-0"),
    pytest.param((NO_AUTH,), s4_request("0.0.0.1", 80, b"", b""), id="4a-empty-hostname"),
    pytest.param((USERPASS,), s4_request("127.0.0.1", 80), id="auth-required"),
    pytest.param((NO_AUTH,), b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 256, id="userid-256"),
    pytest.param(
        (NO_AUTH,),
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"h" * 256,
        id="hostname-256",
    ),
]


@pytest.mark.parametrize(("methods", "data"), S4_ERRORS)
def test_socks4_errors(methods: tuple[int, ...], data: bytes) -> None:
    for chunks in ([data], one_by_one(data)):
        outcome = drive(chunks, methods, eof=False)
        assert outcome.error is not None
        assert outcome.error[1] == 0x5B
        assert outcome.wire == S4_REJECT
        assert outcome.events == []


def test_socks4_field_limit_bounds_buffering() -> None:
    server = SocksServer()
    server.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 255)
    assert server.next_event() is NEED_DATA  # 255 bytes may still end with a NUL
    server.receive_data(b"u")
    with pytest.raises(ProtocolError) as info:
        server.next_event()
    assert info.value.reply == S4_REJECT


# -- EOF, trailing data, misuse --------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"\x05", GREET, GREET + b"\x05\x01\x00\x03\x05abc", b"\x04\x01\x00\x50\x7f\x00\x00\x01u"],
)
def test_eof_during_handshake(data: bytes) -> None:
    outcome = drive([data])
    assert outcome.error == ("connection closed during handshake", None)
    assert outcome.wire == (SEL_NO_AUTH if data.startswith(GREET) else b"")


def test_complete_request_then_eof_is_fine() -> None:
    server = SocksServer()
    server.receive_data(GREET + s5_domain(b"example.com") + b"x")
    server.receive_data(b"")
    assert isinstance(server.next_event(), ConnectRequest)
    assert server.eof_received
    assert server.trailing_data() == b"x"


def test_trailing_data_all_in_one_chunk_and_after() -> None:
    server = SocksServer()
    server.receive_data(GREET + s5_request(1, bytes([1, 2, 3, 4]), 80) + b"GET / HTTP/1.1\r\n")
    assert server.next_event() == ConnectRequest(5, "1.2.3.4", 80, "ipv4")
    assert server.data_to_send() == SEL_NO_AUTH
    server.receive_data(b"Host: x\r\n\r\n")
    assert server.trailing_data() == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    assert server.trailing_data() == b""
    server.receive_data(b"more")
    assert server.trailing_data() == b"more"


def test_errors_are_sticky() -> None:
    server = SocksServer()
    server.receive_data(b"\x05\x00")
    with pytest.raises(ProtocolError) as first:
        server.next_event()
    server.receive_data(b"ignored")
    with pytest.raises(ProtocolError) as second:
        server.next_event()
    assert first.value is second.value
    assert server.data_to_send() == b""


def test_misuse_raises_runtime_error() -> None:
    with pytest.raises(ValueError):
        SocksServer(methods=())
    with pytest.raises(ValueError):
        SocksServer(methods=(0x01,))
    server = SocksServer(methods=(USERPASS,))
    with pytest.raises(RuntimeError):
        server.trailing_data()
    with pytest.raises(RuntimeError):
        server.reply(0)
    with pytest.raises(RuntimeError):
        server.auth_result(True)
    server.receive_data(b"\x05\x01\x02\x01\x01u\x01p")
    assert isinstance(server.next_event(), AuthRequest)
    with pytest.raises(RuntimeError):
        server.next_event()
    server.auth_result(True)
    server.receive_data(s5_domain(b"a.example"))
    assert isinstance(server.next_event(), ConnectRequest)
    with pytest.raises(RuntimeError):
        server.next_event()
    server.receive_data(b"")
    with pytest.raises(RuntimeError):
        server.receive_data(b"late")


# -- hypothesis ------------------------------------------------------------------------

METHOD_SETS = st.sampled_from([(NO_AUTH,), (USERPASS,), (USERPASS, NO_AUTH), (NO_AUTH, USERPASS)])
LABEL = st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True)
HOSTNAMES = st.lists(LABEL, min_size=1, max_size=6).map(".".join)
PORTS = st.integers(1, 65535)
EARLY = st.binary(max_size=64)
CUTS = st.lists(st.integers(0, 1200), max_size=8)


@dataclass
class Handshake:
    """A valid client handshake and what the server must make of it."""

    data: bytes
    methods: tuple[int, ...]
    events: list[AuthRequest | ConnectRequest]
    wire: bytes
    early: bytes


@st.composite
def socks5_destinations(draw: st.DrawFn) -> tuple[bytes, str, str]:
    kind = draw(st.sampled_from(["ipv4", "ipv6", "domain"]))
    if kind == "ipv4":
        addr4 = draw(st.ip_addresses(v=4))
        return b"\x01" + addr4.packed, str(addr4), "ipv4"
    if kind == "ipv6":
        addr6 = draw(st.ip_addresses(v=6))
        return b"\x04" + addr6.packed, socket.inet_ntop(socket.AF_INET6, addr6.packed), "ipv6"
    name = draw(HOSTNAMES)
    sent = draw(st.sampled_from([name, name.upper(), name + "."]))
    return b"\x03" + bytes((len(sent),)) + sent.encode(), name, "domain"


@st.composite
def socks5_handshakes(draw: st.DrawFn) -> Handshake:
    addr, host, atyp = draw(socks5_destinations())
    port = draw(PORTS)
    early = draw(EARLY)
    request = b"\x05\x01\x00" + addr + struct.pack("!H", port)
    connect = ConnectRequest(5, host, port, atyp)
    if draw(st.booleans()):
        methods = draw(st.sampled_from([(NO_AUTH,), (NO_AUTH, USERPASS)]))
        offered = draw(st.sampled_from([b"\x00", b"\x02\x00", b"\x00\x01\x80"]))
        greeting = b"\x05" + bytes((len(offered),)) + offered
        return Handshake(greeting + request + early, methods, [connect], SEL_NO_AUTH, early)
    user = draw(st.binary(max_size=255))
    password = draw(st.binary(max_size=255))
    subneg = b"\x01" + bytes((len(user),)) + user + bytes((len(password),)) + password
    auth = AuthRequest(user.decode("latin-1"), password.decode("latin-1"))
    methods = draw(st.sampled_from([(USERPASS,), (USERPASS, NO_AUTH)]))
    data = b"\x05\x02\x00\x02" + subneg + request + early
    return Handshake(data, methods, [auth, connect], b"\x05\x02\x01\x00", early)


@st.composite
def socks4_handshakes(draw: st.DrawFn) -> Handshake:
    ip = draw(st.ip_addresses(v=4).filter(lambda a: not a.packed.startswith(b"\0\0\0")))
    name = draw(st.none() | HOSTNAMES)
    user = draw(st.binary(max_size=255).map(lambda b: b.replace(b"\x00", b"")))
    port = draw(PORTS)
    early = draw(EARLY)
    if name is None:
        data = s4_request(str(ip), port, user) + early
        expected = ConnectRequest(4, str(ip), port, "ipv4", user)
    else:
        x = draw(st.integers(1, 255))
        data = s4_request(f"0.0.0.{x}", port, user, name.encode()) + early
        expected = ConnectRequest(4, name, port, "domain", user)
    return Handshake(data, (NO_AUTH,), [expected], b"", early)


HANDSHAKES = socks5_handshakes() | socks4_handshakes()


@st.composite
def mutated(draw: st.DrawFn, handshakes: st.SearchStrategy[Handshake]) -> bytes:
    """A valid handshake with a few bytes overwritten, inserted, deleted or cut off."""
    data = bytearray(draw(handshakes).data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if op == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 0xFF, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            del data[at:]
    return bytes(data)


PREFIXES = st.sampled_from(
    [b"", b"\x04\x01", b"\x05", GREET, b"\x05\x01\x02\x01", GREET + b"\x05\x01\x00"]
)

# Any bytes; random tails behind handshake-like prefixes; mutated valid handshakes.
HANDSHAKE_BYTES = (
    st.binary(max_size=700)
    | st.builds(lambda prefix, rest: prefix + rest, PREFIXES, st.binary(max_size=600))
    | mutated(HANDSHAKES)
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def auth_decision(request: AuthRequest) -> bool:
    return not request.username.startswith("x")


@FUZZ
@given(data=HANDSHAKE_BYTES, methods=METHOD_SETS, cuts=CUTS)
def test_fuzz_any_bytes_parse_or_protocol_error_same_for_any_split(
    data: bytes, methods: tuple[int, ...], cuts: list[int]
) -> None:
    whole = drive([data], methods, auth_ok=auth_decision)
    assert drive(split(data, cuts), methods, auth_ok=auth_decision) == whole
    assert drive(one_by_one(data), methods, auth_ok=auth_decision) == whole
    if whole.error is None:
        assert isinstance(whole.events[-1], ConnectRequest)
        assert data.endswith(whole.trailing)  # early data preserved byte for byte
    elif whole.error[1] is not None and whole.error[1] not in (0x01, 0xFF):
        # SOCKS5 request failures and SOCKS4 rejections end in their fixed-size reply.
        assert whole.wire[-8:] in (S4_REJECT, s5_error(whole.error[1])[-8:])


@FUZZ
@given(data=mutated(HANDSHAKES) | st.binary(max_size=1100), methods=METHOD_SETS)
def test_fuzz_waiting_is_bounded(data: bytes, methods: tuple[int, ...]) -> None:
    outcome = drive([data], methods, auth_ok=auth_decision, eof=False)
    if outcome.error is None and not any(isinstance(e, ConnectRequest) for e in outcome.events):
        # Still waiting: every message is bounded (greeting 257, RFC 1929 513,
        # SOCKS5 request 262, SOCKS4a request 520), so the wait is too.
        assert len(data) < (257 + 513 + 262 if USERPASS in methods else 520)


@FUZZ
@given(handshake=HANDSHAKES, cuts=CUTS)
def test_round_trip(handshake: Handshake, cuts: list[int]) -> None:
    for chunks in (split(handshake.data, cuts), [handshake.data]):
        outcome = drive(chunks, handshake.methods)
        assert outcome.error is None
        assert outcome.events == handshake.events
        assert outcome.wire == handshake.wire
        assert outcome.trailing == handshake.early


@FUZZ
@given(handshake=socks4_handshakes())
def test_socks4_protocol_name(handshake: Handshake) -> None:
    (request,) = drive([handshake.data]).events
    assert isinstance(request, ConnectRequest)
    assert request.protocol == ("socks4a" if request.atyp == "domain" else "socks4")
