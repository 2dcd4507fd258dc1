"""proxytap.policy.target: host names, absolute-form request targets, ``Host`` values."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.errors import ProtocolError
from proxytap.policy.target import (
    ORIGIN_FORM_REASON,
    Target,
    normalize_host,
    parse_host,
    parse_target,
)
from proxytap.proto import socks


def test_normalize_host() -> None:
    assert normalize_host("Example.COM.") == ("example.com", "domain")
    assert normalize_host("1.2.3.4") == ("1.2.3.4", "ipv4")
    assert normalize_host("1.2.3.4.") == ("1.2.3.4", "ipv4")
    assert normalize_host("::FFFF:1.2.3.4") == ("::ffff:1.2.3.4", "ipv6")
    assert normalize_host("1.2.3.4.5") is None
    assert normalize_host("256.1.1.1") is None
    assert normalize_host("0x7f.0.0.1") is None
    assert normalize_host("foo.123a") == ("foo.123a", "domain")
    assert normalize_host("123.example") == ("123.example", "domain")
    assert normalize_host("127.1") is None
    assert normalize_host("ex\u00e4mple.com") is None


def test_socks_judges_names_with_the_same_function() -> None:
    """One judge of host names: the SOCKS parser uses this one, not a copy."""
    assert socks.normalize_host is normalize_host


def test_parse_host() -> None:
    assert parse_host(b"A.example.:8080") == ("a.example", 8080)
    assert parse_host(b"a:") == ("a", None)
    assert parse_host(b"[::1]") == ("::1", None)
    for bad in (b"[::1", b"[a]:1", b"a:1:2", b"a b", b"a:+1", b"a:123456", b"a]:1", b":80"):
        assert parse_host(bad) is None, bad


V6 = Target("::ffff:1.2.3.4", 81, b"[::FFFF:1.2.3.4]:81", b"/")


@pytest.mark.parametrize(
    ("url", "method", "expected"),
    [
        (b"http://Example.COM/p?q=1", b"GET", Target("example.com", 80, b"Example.COM", b"/p?q=1")),
        (b"HTTP://a:8080", b"GET", Target("a", 8080, b"a:8080", b"/")),
        (b"http://a", b"OPTIONS", Target("a", 80, b"a", b"*")),
        (b"http://a?x=1", b"GET", Target("a", 80, b"a", b"/?x=1")),
        (b"http://a/p#frag", b"GET", Target("a", 80, b"a", b"/p")),
        (b"http://a#frag", b"GET", Target("a", 80, b"a", b"/")),
        (b"http://[::FFFF:1.2.3.4]:81/", b"GET", V6),
        (b"http://1.2.3.4./", b"GET", Target("1.2.3.4", 80, b"1.2.3.4.", b"/")),
    ],
)  # fmt: skip
def test_parse_target_accepts(url: bytes, method: bytes, expected: Target) -> None:
    assert parse_target(url, method) == expected


@pytest.mark.parametrize(
    ("url", "status", "reason"),
    [
        (b"/p", 400, ORIGIN_FORM_REASON),
        (b"*", 400, "asterisk-form"),
        (b"http://a/\x00", 400, "invalid character"),
        (b"http://a/ b", 400, "invalid character"),
        (b"http:/a/", 400, "invalid request target"),
        (b"1http://a/", 400, "invalid request target"),
        (b"https://a/", 501, "CONNECT tunnel"),
        (b"ftp://a/", 501, "only http://"),
        (b"http://u@a/", 400, "userinfo"),
        (b"http://[::1/", 400, "invalid host"),
        (b"http://[a]/", 400, "invalid host"),
        (b"http://[::1]x/", 400, "invalid port"),
        (b"http://a:/", 400, "invalid port"),
        (b"http://a:0/", 400, "invalid port"),
        (b"http://a:65536/", 400, "invalid port"),
        (b"http://a:123456/", 400, "invalid port"),
        (b"http://:80/", 400, "invalid host"),
        (b"http://127.1/", 400, "invalid host"),
        (b"http://a%41/", 400, "invalid host"),
    ],
)
def test_parse_target_refuses(url: bytes, status: int, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_target(url, b"GET")
    assert info.value.status == status
    assert reason in info.value.reason
    assert info.value.proxy_status == "http_request_error"


@settings(max_examples=500, deadline=None)
@given(url=st.binary(max_size=40) | st.binary(max_size=30).map(lambda b: b"http://" + b))
def test_fuzz_parse_target(url: bytes) -> None:
    """Any bytes: a target whose host passes normalize_host, or a ProtocolError."""
    try:
        target = parse_target(url, b"GET")
    except ProtocolError as exc:
        assert exc.status in (400, 501)
        return
    assert normalize_host(target.host) is not None
    assert 1 <= target.port <= 65535
    assert target.path[:1] == b"/"
