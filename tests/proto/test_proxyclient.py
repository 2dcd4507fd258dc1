"""proxytap.proto.proxyclient: the requests byte for byte, every reply, any split, fuzzing.

The SOCKS side is also checked against proxytap's own server parser
(``proto.socks.SocksServer``): what the client asks is what a server reads.
"""

from __future__ import annotations

import base64
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.errors import Failure
from proxytap.proto.proxyclient import (
    AUTH,
    PROTOCOL,
    REFUSED,
    ChainRefused,
    Established,
    Kind,
    ProxyClient,
)
from proxytap.proto.socks import (
    NEED_DATA,
    NO_AUTH,
    USERPASS,
    AuthRequest,
    ConnectRequest,
    SocksServer,
)

FUZZ = settings(max_examples=300, deadline=None)


def run(client: ProxyClient, replies: bytes, *, split: int = 0) -> bytes:
    """Start, then feed ``replies`` whole (or ``split`` bytes at a time) until established.

    Returns all bytes sent; what was not fed (the caller's protocol reads it
    then) is appended to ``established.rest`` for the assertions.
    """
    sent = bytearray(client.start())
    step = split or max(1, len(replies))
    for i in range(0, len(replies), step):
        sent += client.receive_data(replies[i : i + step])
        if client.established is not None:
            rest = client.established.rest + replies[i + step :]
            client.established = Established(client.established.bound, rest)
            break
    return bytes(sent)


# -- HTTP CONNECT ------------------------------------------------------------------------


def test_http_connect_request_and_200() -> None:
    client = ProxyClient(Kind.HTTP, "example.com", 443)
    sent = run(client, b"HTTP/1.1 200 Connection established\r\n\r\nserver-first")
    assert sent == b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    assert client.established == Established(None, b"server-first")


def test_http_connect_credentials_and_ipv6_brackets() -> None:
    client = ProxyClient(Kind.HTTP, "2001:db8::1", 8443, username="alice", password="s:cret")
    sent = run(client, b"HTTP/1.0 200 OK\r\nX: y\r\n\r\n")
    token = base64.b64encode(b"alice:s:cret").decode()
    assert sent == (
        b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n"
        + f"Proxy-Authorization: Basic {token}\r\n\r\n".encode()
    )
    assert client.established == Established(None, b"")


@pytest.mark.parametrize("split", [1, 2, 7])
def test_http_reply_in_any_split_keeps_what_follows(split: int) -> None:
    client = ProxyClient(Kind.HTTP, "example.com", 25)
    replies = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n220 smtp ready\r\n"
    run(client, replies, split=split)
    assert client.established == Established(None, b"220 smtp ready\r\n")


def test_bytes_after_the_head_in_later_reads_are_not_the_handshake_s() -> None:
    client = ProxyClient(Kind.HTTP, "example.com", 25)
    client.start()
    assert client.receive_data(b"HTTP/1.1 200 OK\r\n\r") == b""
    pending = client.established
    assert pending is None
    assert client.receive_data(b"\nbanner") == b""
    assert client.established == Established(None, b"banner")
    with pytest.raises(RuntimeError):
        client.receive_data(b"more")  # the caller's protocol reads from here on


@pytest.mark.parametrize(
    ("head", "stage", "failure"),
    [
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n", AUTH, Failure.PROXY_CONFIG),
        (
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b"Proxy-Status: up; error=http_request_denied\r\n\r\n",
            AUTH,
            Failure.PROXY_CONFIG,  # about proxytap's credentials, whatever the type says
        ),
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", REFUSED, Failure.DENIED),
        (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", REFUSED, Failure.HOST_UNREACHABLE),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", REFUSED, Failure.HOST_UNREACHABLE),
        (b"HTTP/1.1 504 Gateway Timeout\r\n\r\n", REFUSED, Failure.TIMEOUT),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", REFUSED, Failure.INTERNAL),
        # the upstream's own Proxy-Status error type wins over the status
        (
            b"HTTP/1.1 502 Bad Gateway\r\nProxy-Status: up; error=dns_error; "
            b'details="no such name"\r\n\r\n',
            REFUSED,
            Failure.DNS_ERROR,
        ),
        (
            b"HTTP/1.1 502 Bad Gateway\r\nproxy-status: a; error=dns_error, "
            b"b; error=connection_refused\r\n\r\n",
            REFUSED,
            Failure.REFUSED,  # the last member: the proxy closest to proxytap
        ),
        (
            b"HTTP/1.1 502 Bad Gateway\r\nProxy-Status: up; error=made_up_type\r\n\r\n",
            REFUSED,
            Failure.HOST_UNREACHABLE,
        ),
        (b"SSH-2.0-OpenSSH\r\n\r\n", PROTOCOL, Failure.INTERNAL),
    ],
)
def test_http_refusals(head: bytes, stage: str, failure: Failure) -> None:
    client = ProxyClient(Kind.HTTP, "example.com", 443)
    client.start()
    with pytest.raises(ChainRefused) as info:
        client.receive_data(head)
    assert (info.value.stage, info.value.failure) == (stage, failure)


def test_http_head_too_large_and_early_close() -> None:
    client = ProxyClient(Kind.HTTP, "example.com", 443, max_head=64)
    client.start()
    with pytest.raises(ChainRefused) as info:
        client.receive_data(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20)
    assert info.value.stage == PROTOCOL
    closed = ProxyClient(Kind.HTTP, "example.com", 443)
    closed.start()
    closed.receive_data(b"HTTP/1.1 200")
    with pytest.raises(ChainRefused) as info:
        closed.receive_data(b"")
    assert (info.value.stage, info.value.failure) == (PROTOCOL, Failure.INTERNAL)


# -- SOCKS5 ------------------------------------------------------------------------------


def test_socks5_no_auth_name_and_bound_address() -> None:
    client = ProxyClient(Kind.SOCKS5, "example.com", 443)
    reply = b"\x05\x00" + b"\x05\x00\x00\x01\x0a\x00\x00\x07\x9c\x41" + b"hi"
    sent = run(client, reply)
    assert sent == b"\x05\x01\x00" + b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"
    assert client.established == Established(("10.0.0.7", 40001), b"hi")


@pytest.mark.parametrize("split", [1, 3])
def test_socks5_user_password_ipv6_in_any_split(split: int) -> None:
    client = ProxyClient(Kind.SOCKS5, "2001:db8::5", 80, username="bob", password="pw")
    bound6 = bytes(15) + b"\x01"
    reply = b"\x05\x02" + b"\x01\x00" + b"\x05\x00\x00\x04" + bound6 + b"\x00\x50"
    sent = run(client, reply, split=split)
    request = b"\x05\x01\x00\x04" + bytes.fromhex("20010db8" + "0" * 23 + "5") + b"\x00\x50"
    assert sent == b"\x05\x02\x00\x02" + b"\x01\x03bob\x02pw" + request
    assert client.established == Established(("::1", 80), b"")


def test_socks5_domain_bound_address() -> None:
    client = ProxyClient(Kind.SOCKS5, "192.0.2.1", 22)
    run(client, b"\x05\x00" + b"\x05\x00\x00\x03\x04host\x00\x16")
    assert client.established == Established(("host", 22), b"")


@pytest.mark.parametrize(
    ("code", "failure"),
    [
        (0x01, Failure.INTERNAL),
        (0x02, Failure.PROHIBITED),
        (0x03, Failure.NET_UNREACHABLE),
        (0x04, Failure.HOST_UNREACHABLE),
        (0x05, Failure.REFUSED),
        (0x06, Failure.TIMEOUT),
        (0x07, Failure.INTERNAL),
        (0x08, Failure.INTERNAL),
        (0x42, Failure.INTERNAL),
    ],
)
def test_socks5_reply_codes(code: int, failure: Failure) -> None:
    client = ProxyClient(Kind.SOCKS5, "example.com", 443)
    client.start()
    with pytest.raises(ChainRefused) as info:
        # judged on the code alone: servers send short failure replies
        client.receive_data(b"\x05\x00\x05" + bytes([code]))
    assert (info.value.stage, info.value.failure) == (REFUSED, failure)


@pytest.mark.parametrize(
    ("username", "replies"),
    [
        ("bob", b"\x05\x02\x01\x01"),  # RFC 1929 failure
        ("bob", b"\x05\xff"),  # no acceptable method
        (None, b"\x05\xff"),  # the upstream wants credentials proxytap has not got
    ],
)
def test_socks5_credentials_refused_is_a_configuration_error(
    username: str | None, replies: bytes
) -> None:
    client = ProxyClient(Kind.SOCKS5, "example.com", 443, username=username, password="pw")
    client.start()
    with pytest.raises(ChainRefused) as info:
        client.receive_data(replies)
    assert (info.value.stage, info.value.failure) == (AUTH, Failure.PROXY_CONFIG)


@pytest.mark.parametrize(
    "replies",
    [
        b"\x04\x00",  # not SOCKS5
        b"\x05\x02",  # user/password chosen, none offered
        b"\x05\x00\x04\x00\x00\x01",  # reply version
        b"\x05\x00\x05\x00\x00\x09",  # address type
    ],
)
def test_socks5_malformed_answers(replies: bytes) -> None:
    client = ProxyClient(Kind.SOCKS5, "example.com", 443)
    client.start()
    with pytest.raises(ChainRefused) as info:
        client.receive_data(replies)
    assert info.value.stage == PROTOCOL


# -- SOCKS4 / SOCKS4a ----------------------------------------------------------------------


def test_socks4_address_and_socks4a_name() -> None:
    four = ProxyClient(Kind.SOCKS4, "192.0.2.9", 80, username="u1")
    assert run(four, b"\x00\x5a\x00\x50\xc0\x00\x02\x09tail") == (
        b"\x04\x01\x00\x50\xc0\x00\x02\x09u1\x00"
    )
    assert four.established == Established(("192.0.2.9", 80), b"tail")
    four_a = ProxyClient(Kind.SOCKS4, "example.com", 443)
    assert run(four_a, b"\x00\x5a" + bytes(6)) == (
        b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.com\x00"
    )
    assert four_a.established == Established(("0.0.0.0", 0), b"")


@pytest.mark.parametrize(
    ("code", "stage", "failure"),
    [
        (0x5B, REFUSED, Failure.HOST_UNREACHABLE),
        (0x5C, AUTH, Failure.PROXY_CONFIG),
        (0x5D, AUTH, Failure.PROXY_CONFIG),
    ],
)
def test_socks4_refusals(code: int, stage: str, failure: Failure) -> None:
    client = ProxyClient(Kind.SOCKS4, "example.com", 443)
    client.start()
    with pytest.raises(ChainRefused) as info:
        client.receive_data(b"\x00" + bytes([code]) + bytes(6))
    assert (info.value.stage, info.value.failure) == (stage, failure)


def test_socks4_cannot_ask_for_ipv6() -> None:
    with pytest.raises(ValueError, match="IPv6"):
        ProxyClient(Kind.SOCKS4, "2001:db8::1", 443)


# -- against proxytap's own SOCKS server parser ----------------------------------------------


def _converse(client: ProxyClient, server: SocksServer) -> ConnectRequest:
    """Run the client against the server until the server has the request."""
    to_server = client.start()
    while True:
        server.receive_data(to_server)
        event = server.next_event()
        to_client = server.data_to_send()
        if isinstance(event, AuthRequest):
            server.auth_result(True)
            to_client += server.data_to_send()
        elif isinstance(event, ConnectRequest):
            return event
        else:
            assert event is NEED_DATA
        to_server = client.receive_data(to_client)


NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True)
HOSTS = NAMES | st.ip_addresses().map(str)
CREDS = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\0"), min_size=1)


@FUZZ
@given(
    host=HOSTS,
    port=st.integers(1, 65535),
    creds=st.none() | st.tuples(CREDS, CREDS),
)
def test_socks5_requests_read_back_by_the_server(
    host: str, port: int, creds: tuple[str, str] | None
) -> None:
    if creds is not None and any(len(c.encode()) > 255 for c in creds):
        return
    user, password = creds if creds is not None else (None, None)
    client = ProxyClient(Kind.SOCKS5, host, port, username=user, password=password)
    methods = (USERPASS,) if creds is not None else (NO_AUTH,)
    request = _converse(client, SocksServer(methods=methods))
    assert (_same(request.host), request.port) == (_same(host), port)


def _same(host: str) -> object:
    """An address as a value (the server writes inet_ntop text: ``::ffff:0.0.0.0``)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host.lower()


@FUZZ
@given(host=NAMES | st.ip_addresses(v=4).map(str), port=st.integers(1, 65535))
def test_socks4_requests_read_back_by_the_server(host: str, port: int) -> None:
    if host.startswith("0.0.0."):
        with pytest.raises(ValueError, match="SOCKS4a"):
            ProxyClient(Kind.SOCKS4, host, port)
        return
    client = ProxyClient(Kind.SOCKS4, host, port, username="u")
    request = _converse(client, SocksServer(methods=(NO_AUTH,)))
    assert (request.host, request.port, request.user_id) == (host, port, b"u")


# -- fuzzing: whatever an upstream answers ----------------------------------------------------


@FUZZ
@given(
    kind=st.sampled_from(list(Kind)),
    answer=st.binary(max_size=300),
    step=st.integers(1, 40),
    creds=st.booleans(),
)
def test_any_answer_is_established_pending_or_chain_refused(
    kind: Kind, answer: bytes, step: int, creds: bool
) -> None:
    client = ProxyClient(
        kind,
        "example.com",
        443,
        username="u" if creds else None,
        password="p" if creds and kind is not Kind.SOCKS4 else None,
        max_head=128,
    )
    client.start()
    try:
        for i in range(0, len(answer), step):
            client.receive_data(answer[i : i + step])
            if client.established is not None:
                break
        if client.established is None:
            client.receive_data(b"")  # the upstream closes: never established by a close
            raise AssertionError("a close before the reply must raise")
    except ChainRefused as exc:
        assert exc.stage in (AUTH, REFUSED, PROTOCOL)
        assert isinstance(exc.failure, Failure)
        return
    assert client.established is not None
