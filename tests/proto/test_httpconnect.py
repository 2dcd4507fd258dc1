"""proxytap.proto.httpconnect: framing, strict parsing, authorities, responses."""

from __future__ import annotations

import ipaddress
import itertools
import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.errors import ProtocolError
from proxytap.proto.httpconnect import (
    MAX_HEAD,
    RequestHead,
    connect_established,
    error_response,
    head_end,
    parse_authority,
    parse_head,
    proxy_status_value,
)

FUZZ = settings(max_examples=400, deadline=None)

# -- head_end ------------------------------------------------------------------------

HEAD = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"


@pytest.mark.parametrize(
    ("buf", "end"),
    [
        (HEAD, len(HEAD)),
        (HEAD + b"\x16\x03\x01early", len(HEAD)),
        (b"CONNECT a:1 HTTP/1.1\r\n\r\n", 24),
        (b"CONNECT a:1 HTTP/1.1\r\n\r\nA: b\nc\n\n", 24),  # after the head: not ours
        (b"\r\n\r\nCONNECT a:1 HTTP/1.1\r\n\r\n", 28),  # leading empty lines skipped
        (b"\nCONNECT a:1 HTTP/1.1\r\n\r\n", 25),
        (b"", None),
        (b"\r\n", None),
        (b"CONNECT a:1 HTTP/1.1", None),
        (b"CONNECT a:1 HTTP/1.1\r\n", None),
        (b"CONNECT a:1 HTTP/1.1\r\nHost: a\r\n\r", None),
        (b"CONNECT a:1 HTTP/1.1\r\n\r\r\n", None),  # "\r\r\n" is no blank line
    ],
)
def test_head_end(buf: bytes, end: int | None) -> None:
    assert head_end(buf) == end
    assert head_end(bytearray(buf)) == end


@pytest.mark.parametrize(
    "buf",
    [
        b"CONNECT a:1 HTTP/1.1\n\n",
        b"CONNECT a:1 HTTP/1.1\n",
        b"CONNECT a:1 HTTP/1.1\r\nA: b\n\r\n",
        b"CONNECT a:1 HTTP/1.1\nA: b\r\n\n",
        b"CONNECT a:1 HTTP/1.1\r\nA: b\r\n\n",
        b"CONNECT a:1 HTTP/1.1\r\nA: b\nB: c",  # known before the head is complete
        b"\r\nGET / HTTP/1.1\r\nX: \n\r\n\r\n",
    ],
)
def test_bare_lf_is_rejected(buf: bytes) -> None:
    """llhttp (the forwarder's parser) rejects a bare LF: so does this parser (no differential)."""
    with pytest.raises(ProtocolError) as info:
        head_end(buf)
    assert info.value.status == 400
    assert "bare LF" in info.value.reason
    with pytest.raises(ProtocolError):
        parse_head(buf + b"\r\n\r\n")


def test_head_end_limits() -> None:
    head = b"GET /0123456789 HTTP/1.1\r\nA: b\r\n\r\n"  # request line 24 bytes
    assert head_end(head, limit=len(head)) == len(head)
    assert head_end(head, line_limit=24) == len(head)
    with pytest.raises(ProtocolError) as info:
        head_end(head, line_limit=23)
    assert info.value.status == 414
    assert info.value.proxy_status == "http_request_error"
    with pytest.raises(ProtocolError) as info:
        head_end(head, limit=len(head) - 1)
    assert info.value.status == 431
    # No line end yet, but already longer than a request line may be: 414 at once.
    assert head_end(b"G" * 25, line_limit=24) is None
    with pytest.raises(ProtocolError) as info:
        head_end(b"G" * 26, line_limit=24)
    assert info.value.status == 414
    # Endless header lines: 431 once the limit is reached without an end.
    assert head_end(b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 10, limit=100) is None
    with pytest.raises(ProtocolError) as info:
        head_end(b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 20, limit=100)
    assert info.value.status == 431
    # Only empty lines: still bounded.
    with pytest.raises(ProtocolError) as info:
        head_end(b"\r\n" * 60, limit=100)
    assert info.value.status == 431
    # A request line longer than the whole head limit: 431.
    with pytest.raises(ProtocolError) as info:
        head_end(b"G" * 200, limit=100)
    assert info.value.status == 431


def test_max_head_default() -> None:
    assert MAX_HEAD == 65536
    big = b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * (MAX_HEAD - 30) + b"\r\n"
    assert head_end(big) is None
    with pytest.raises(ProtocolError):
        head_end(big + b"Z: " + b"z" * 40)


# -- parse_head ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("buf", "expected"),
    [
        (
            HEAD + b"ignored",
            RequestHead(
                "CONNECT", "example.com:443", "HTTP/1.1", (("Host", "example.com:443"),), len(HEAD)
            ),
        ),
        (
            b"GET http://a/ HTTP/1.0\r\nX-A:v\r\nX-B: \t v  w \t\r\nX-C:\r\nX-D:  \r\n\r\n",
            RequestHead(
                "GET",
                "http://a/",
                "HTTP/1.0",
                (("X-A", "v"), ("X-B", "v  w"), ("X-C", ""), ("X-D", "")),
                62,
            ),
        ),
        (
            b"\nCONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\nUser-Agent: t\xe9st\r\n\r\n",
            RequestHead(
                "CONNECT",
                "[::1]:443",
                "HTTP/1.1",
                (("Host", "[::1]:443"), ("User-Agent", "t\xe9st")),
                66,
            ),
        ),
        (
            b"\r\nM-SEARCH * HTTP/1.2\r\nhost:x\r\n\r\n",
            RequestHead("M-SEARCH", "*", "HTTP/1.1", (("host", "x"),), 33),
        ),
        (
            b"OPTIONS * HTTP/1.1\r\nA: b\tc\r\nA: d\r\n\r\n",
            RequestHead("OPTIONS", "*", "HTTP/1.1", (("A", "b\tc"), ("A", "d")), 36),
        ),
    ],
)
def test_parse_head(buf: bytes, expected: RequestHead) -> None:
    assert parse_head(buf) == expected
    assert parse_head(bytearray(buf)) == expected
    assert head_end(buf) == expected.head_length


def test_request_head_values() -> None:
    head = parse_head(b"GET / HTTP/1.1\r\nA: 1\r\nb: 2\r\na: 3\r\n\r\n")
    assert head.values("a") == ("1", "3")
    assert head.values("B") == ("2",)
    assert head.values("c") == ()


PARSE_ERRORS = [
    pytest.param(b"CONNECT a:1 HTTP/1.1\r\n", 400, id="incomplete"),
    pytest.param(b"CONNECT a:1 http/1.1\r\n\r\n", 400, id="lower-case-version"),
    pytest.param(b"CONNECT a:1 HTTP/1.1 \r\n\r\n", 400, id="trailing-space"),
    pytest.param(b"CONNECT  a:1 HTTP/1.1\r\n\r\n", 400, id="double-space"),
    pytest.param(b"CONNECT\ta:1 HTTP/1.1\r\n\r\n", 400, id="tab-separator"),
    pytest.param(b"CONNECT a:1\r\n\r\n", 400, id="no-version"),
    pytest.param(b"CONNECT HTTP/1.1\r\n\r\n", 400, id="no-target"),
    pytest.param(b" CONNECT a:1 HTTP/1.1\r\n\r\n", 400, id="leading-space"),
    pytest.param(b"GE(T / HTTP/1.1\r\n\r\n", 400, id="method-not-token"),
    pytest.param(b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", 400, id="non-ascii-target"),
    pytest.param(b"GET /\x7f HTTP/1.1\r\n\r\n", 400, id="del-in-target"),
    pytest.param(b"GET /\x00 HTTP/1.1\r\n\r\n", 400, id="nul-in-target"),
    pytest.param(b"GET / HTTP/1\r\n\r\n", 400, id="version-no-minor"),
    pytest.param(b"GET / HTTP/1.10\r\n\r\n", 400, id="version-two-digit-minor"),
    pytest.param(b"GET / HTTPS/1.1\r\n\r\n", 400, id="version-wrong-name"),
    pytest.param(b"GET / HTTP/2.0\r\n\r\n", 505, id="http2"),
    pytest.param(b"GET / HTTP/3.0\r\n\r\n", 505, id="http3"),
    pytest.param(b"GET / HTTP/0.9\r\n\r\n", 505, id="http09"),
    pytest.param(b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n", 400, id="obs-fold-space"),
    pytest.param(b"GET / HTTP/1.1\r\nA: b\r\n\tfolded\r\n\r\n", 400, id="obs-fold-tab"),
    pytest.param(b"GET / HTTP/1.1\r\n A: b\r\n\r\n", 400, id="space-before-first-header"),
    pytest.param(b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n", 400, id="bare-cr-in-value"),
    pytest.param(b"GET / HTTP/1.1\rX\r\n\r\n", 400, id="bare-cr-in-request-line"),
    pytest.param(b"GET / HTTP/1.1\r\nA: b\r\r\n\r\n", 400, id="cr-cr-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n", 400, id="nul-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nA: b\x01c\r\n\r\n", 400, id="ctl-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nA: b\x7f\r\n\r\n", 400, id="del-in-value"),
    pytest.param(b"GET / HTTP/1.1\r\nA : b\r\n\r\n", 400, id="space-before-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nA\t: b\r\n\r\n", 400, id="tab-before-colon"),
    pytest.param(b"GET / HTTP/1.1\r\n: b\r\n\r\n", 400, id="empty-name"),
    pytest.param(b"GET / HTTP/1.1\r\nA\r\n\r\n", 400, id="no-colon"),
    pytest.param(b"GET / HTTP/1.1\r\nA(b: c\r\n\r\n", 400, id="name-not-token"),
    pytest.param(b"GET / HTTP/1.1\r\n\xc3\xa4: c\r\n\r\n", 400, id="non-ascii-name"),
    pytest.param(b"GET / HTTP/1.1\r\nA\x00: c\r\n\r\n", 400, id="nul-in-name"),
    pytest.param(b"\r\n\r\n", 400, id="only-empty-lines"),
]


@pytest.mark.parametrize(("buf", "status"), PARSE_ERRORS)
def test_parse_head_errors(buf: bytes, status: int) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_head(buf)
    assert info.value.status == status
    assert info.value.proxy_status == "http_request_error"
    assert info.value.reason


# -- parse_authority -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("example.com:443", ("example.com", 443)),
        ("Example.COM.:443", ("example.com", 443)),
        ("a:1", ("a", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("_dmarc.xn--bcher-kva.example:8080", ("_dmarc.xn--bcher-kva.example", 8080)),
        ("192.0.2.1:80", ("192.0.2.1", 80)),
        ("192.0.2.1.:80", ("192.0.2.1", 80)),
        ("example.com:0443", ("example.com", 443)),
        ("[::1]:443", ("::1", 443)),
        ("[2001:DB8:0:0:0:0:0:1]:443", ("2001:db8::1", 443)),
        ("[::FFFF:192.0.2.1]:443", ("::ffff:192.0.2.1", 443)),
        ("a" * 63 + ".b:1", ("a" * 63 + ".b", 1)),
    ],
)
def test_parse_authority(target: str, expected: tuple[str, int]) -> None:
    assert parse_authority(target) == expected


@pytest.mark.parametrize(
    "target",
    [
        "",
        "example.com",
        "example.com:",
        ":443",
        "example.com:0",
        "example.com:65536",
        "example.com:99999",
        "example.com:000443",
        "example.com:+443",
        "example.com:-1",
        "example.com: 443",
        "example.com :443",
        "example.com:443 ",
        "example.com:4 43",
        "example.com:\u0664\u0664\u0663",  # Arabic-Indic digits
        "example.com:443/",
        "example.com:443/path",
        "http://example.com:443",
        "user@example.com:443",
        "user:pw@example.com:443",
        "exa mple.com:443",
        "exa_mple,com:443",
        "ex%61mple.com:443",
        "\u00e9t\u00e9.example:443",
        "a..b:443",
        ".a:443",
        "x" * 64 + ".com:443",
        ("a" * 63 + ".") * 3 + "a" * 62 + ":443",  # 254 characters
        "127.1:80",
        "0x7f000001:80",
        "0177.0.0.1:80",
        "2130706433:80",
        "256.1.1.1:80",
        "::1:443",
        "[::1]",
        "[::1]443",
        "[::1]:",
        "[::1]:0",
        "[::1:443",
        "::1]:443",
        "[fe80::1%eth0]:443",
        "[fe80::1%25eth0]:443",
        "[v1.fe]:443",
        "[192.0.2.1]:443",
        "[example.com]:443",
        "[[::1]]:443",
        "[::1]:443:1",
        "*:443",
    ],
)
def test_parse_authority_errors(target: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_authority(target)
    assert info.value.status == 400
    assert info.value.proxy_status == "http_request_error"


# -- responses -----------------------------------------------------------------------


def test_connect_established() -> None:
    assert connect_established() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert connect_established("HTTP/1.0") == b"HTTP/1.0 200 Connection established\r\n\r\n"
    with pytest.raises(ValueError):
        connect_established("HTTP/2")


def test_error_response_exact() -> None:
    assert error_response(502, "the destination refused the connection", "connection_refused") == (
        b"HTTP/1.1 502 Bad Gateway\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 39\r\n"
        b"Proxy-Status: proxytap; error=connection_refused\r\n"
        b"Connection: close\r\n"
        b"\r\n"
        b"the destination refused the connection\n"
    )


def test_error_response_options() -> None:
    response = error_response(
        407,
        "proxy authentication required",
        "http_request_denied",
        version="HTTP/1.0",
        proxy_name="edge-1.example",
        details='bad "creds" \\ for \u00fcser\r\nX-Injected: 1',
        extra_headers=[("Proxy-Authenticate", 'Basic realm="proxytap"')],
        close=False,
    )
    assert response == (
        b"HTTP/1.0 407 Proxy Authentication Required\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 30\r\n"
        b"Proxy-Status: edge-1.example; error=http_request_denied;"
        b' details="bad \\"creds\\" \\\\ for ?ser??X-Injected: 1"\r\n'
        b'Proxy-Authenticate: Basic realm="proxytap"\r\n'
        b"\r\n"
        b"proxy authentication required\n"
    )


def test_error_response_head_and_unicode_body() -> None:
    response = error_response(504, "délai dépassé", "connection_timeout", include_body=False)
    assert response.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert b"Content-Length: 17\r\n" in response  # UTF-8 bytes of the body left out
    assert response.endswith(b"Connection: close\r\n\r\n")
    full = error_response(504, "délai dépassé", "connection_timeout")
    assert full.endswith("délai dépassé\n".encode())


def test_error_response_unknown_status_has_empty_phrase() -> None:
    assert error_response(499, "x", "http_request_error").startswith(b"HTTP/1.1 499 \r\n")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": 200},
        {"status": 600},
        {"status": 399},
        {"proxy_status": "not a token"},
        {"proxy_status": ""},
        {"version": "HTTP/2.0"},
        {"extra_headers": [("Bad Name", "x")]},
        {"extra_headers": [("X", "a\r\nInjected: 1")]},
        {"extra_headers": [("X", "a\nb")]},
        {"extra_headers": [("X", "a\x00b")]},
        {"extra_headers": [("X", " padded")]},
        {"extra_headers": [("X", "\u2603")]},
    ],
)
def test_error_response_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"status": 502, "reason": "r", "proxy_status": "dns_error"}
    args.update(kwargs)
    with pytest.raises(ValueError):
        error_response(**args)  # type: ignore[arg-type]


def test_proxy_status_value() -> None:
    assert proxy_status_value("proxytap", "dns_error") == "proxytap; error=dns_error"
    assert proxy_status_value("my proxy", "dns_error") == '"my proxy"; error=dns_error'
    assert (
        proxy_status_value("p", "dns_error", 'a"b\\c') == 'p; error=dns_error; details="a\\"b\\\\c"'
    )


# -- hypothesis ------------------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
TOKENS = st.text(TCHAR, min_size=1, max_size=12)
TARGETS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40)
VALUE_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
VALUES = st.builds(
    lambda inner: inner.strip(" \t"), st.text(VALUE_CHARS | st.just("\t"), max_size=30)
)
HEADERS = st.lists(st.tuples(TOKENS, VALUES), max_size=8)
EOL = st.just(b"\r\n")
OWS = st.sampled_from(["", " ", "\t", "  \t"])
CUTS = st.lists(st.integers(0, 2000), max_size=8)


@st.composite
def request_heads(draw: st.DrawFn) -> tuple[bytes, RequestHead]:
    method = draw(TOKENS)
    target = draw(TARGETS)
    version = draw(st.sampled_from(["HTTP/1.0", "HTTP/1.1"]))
    headers = draw(HEADERS)
    lead = draw(st.sampled_from([b"", b"\r\n", b"\n"]))
    out = lead + f"{method} {target} {version}".encode() + draw(EOL)
    for name, value in headers:
        line = f"{name}:{draw(OWS)}{value}{draw(OWS)}".encode("latin-1")
        out += line + draw(EOL)
    out += draw(EOL)
    return out, RequestHead(method, target, version, tuple(headers), len(out))


@FUZZ
@given(head=request_heads(), tail=st.binary(max_size=20))
def test_head_round_trip(head: tuple[bytes, RequestHead], tail: bytes) -> None:
    raw, expected = head
    assert head_end(raw + tail) == expected.head_length
    assert parse_head(raw + tail) == expected


@st.composite
def mangled_heads(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(request_heads())[0])
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 58, 0x7F, 0xFF, draw(st.integers(0, 255))]))
        if op == "set" and at < len(raw):
            raw[at] = byte
        elif op == "insert":
            raw[at:at] = bytes((byte,))
        else:
            del raw[at : at + 1]
    return bytes(raw)


ANY_HEAD = st.binary(max_size=300) | mangled_heads()


def incremental_head_end(
    buf: bytes, cuts: list[int], limit: int, line_limit: int
) -> tuple[str, int | None]:
    """head_end over growing prefixes, as a receive loop calls it."""
    points = sorted({len(buf), *(c % (len(buf) + 1) for c in cuts)})
    for point in points:
        try:
            end = head_end(buf[:point], limit, line_limit)
        except ProtocolError as exc:
            assert exc.status in (400, 414, 431)
            return "error", exc.status
        if end is not None:
            return "end", end
    return "more", None


@FUZZ
@given(
    buf=ANY_HEAD,
    cuts=CUTS,
    limit=st.integers(1, 400),
    line_limit=st.integers(1, 200),
)
def test_fuzz_head_end_and_parse_head(
    buf: bytes, cuts: list[int], limit: int, line_limit: int
) -> None:
    whole = incremental_head_end(buf, [], limit, line_limit)
    assert incremental_head_end(buf, cuts, limit, line_limit) == whole
    assert incremental_head_end(buf, list(range(len(buf))), limit, line_limit) == whole
    if whole[0] == "end":
        assert whole[1] is not None and whole[1] <= limit
    try:
        end = head_end(buf, MAX_HEAD, MAX_HEAD)
        head = parse_head(buf)
    except ProtocolError as exc:
        assert exc.status in (400, 505)
        assert exc.proxy_status == "http_request_error"
        return
    assert head.head_length == end
    assert head.version in ("HTTP/1.0", "HTTP/1.1")
    for name, value in head.headers:
        assert name and "\r" not in value and "\n" not in value and "\x00" not in value


@FUZZ
@given(
    host=st.text(max_size=30) | st.from_regex(r"\[?[0-9a-fA-F:.%]{0,20}\]?", fullmatch=True),
    port=st.text(max_size=7) | st.integers(-1, 70000).map(str),
)
def test_fuzz_parse_authority(host: str, port: str) -> None:
    for target in (host, f"{host}:{port}"):
        try:
            name, number = parse_authority(target)
        except ProtocolError as exc:
            assert exc.status == 400
            continue
        assert 1 <= number <= 65535
        assert name == name.lower() and name.isascii()
        assert not set(name) & set(" @/%[],\r\n\x00")


LABEL = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_-]{0,20}", fullmatch=True)
HOSTNAMES = st.lists(LABEL, min_size=1, max_size=6).map(".".join)


@FUZZ
@given(
    host=HOSTNAMES | st.ip_addresses(v=4).map(str) | st.ip_addresses(v=6).map(str),
    port=st.integers(1, 65535),
)
def test_authority_round_trip(host: str, port: int) -> None:
    if ":" in host:
        expected = socket.inet_ntop(socket.AF_INET6, ipaddress.IPv6Address(host).packed)
        assert parse_authority(f"[{host}]:{port}") == (expected, port)
        assert parse_authority(f"[{host.upper()}]:{port}") == (expected, port)
    else:
        assert parse_authority(f"{host}:{port}") == (host.lower(), port)


SF_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"')


@FUZZ
@given(
    status=st.integers(400, 599),
    reason=st.text(max_size=40),
    details=st.none() | st.text(max_size=40),
    proxy_name=st.sampled_from(["proxytap", "edge 1", 'we"ird\\', "ünï"]),
)
def test_error_response_is_well_formed(
    status: int, reason: str, details: str | None, proxy_name: str
) -> None:
    response = error_response(
        status, reason, "proxy_internal_error", details=details, proxy_name=proxy_name
    )
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert len(lines) == 5  # status line + 4 fields, nothing injected
    assert all(b"\n" not in line and b"\r" not in line for line in lines)
    assert body == (reason + "\n").encode()
    assert lines[2] == b"Content-Length: %d" % len(body)
    value = lines[3].decode("ascii").removeprefix("Proxy-Status: ")
    name_part, error_part, *rest = value.split("; ", 2)  # details may hold "; "
    assert name_part == proxy_name or SF_STRING.fullmatch(name_part)
    assert error_part == "error=proxy_internal_error"
    if details is not None:
        assert SF_STRING.fullmatch(rest[0].removeprefix("details="))


def test_every_line_ending_combination() -> None:
    lines = [b"CONNECT a:1 HTTP/1.1", b"Host: a:1", b"X: y"]
    for eols in itertools.product([b"\r\n", b"\n"], repeat=4):
        raw = b"".join(line + eol for line, eol in zip(lines, eols, strict=False)) + eols[3]
        if b"\n" in eols:
            with pytest.raises(ProtocolError) as info:
                head_end(raw)
            assert info.value.status == 400
            with pytest.raises(ProtocolError):
                parse_head(raw)
        else:
            assert head_end(raw) == len(raw)
            assert parse_head(raw).headers == (("Host", "a:1"), ("X", "y"))
