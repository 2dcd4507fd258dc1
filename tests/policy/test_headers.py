"""proxytap.policy.headers: byte tables for validate and rewrite, and hypothesis properties.

The message model, targets and the memos have their own files (test_message,
test_target, test_cache); the chain that re-checks modules is tests/modules/test_chain.py.

Property (issue C): for any header list, validate either raises ``ProtocolError``
or accepts, and then the rewritten output validates again to the same
framing, holds no hop-by-hop field and no CR, LF or NUL, and is left as it
is by a second validate.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from proxytap.errors import ConfigError, ProtocolError
from proxytap.policy.headers import HeaderRule, HeaderRules, HttpConfig
from proxytap.policy.hopbyhop import HOP_BY_HOP
from proxytap.policy.message import RequestHead, ResponseHead, serialize

H = list[tuple[bytes, bytes]]
RULES = HeaderRules()
URL = b"http://example.com/p?q=1"


def request(
    headers: H,
    method: bytes = b"GET",
    target: bytes = URL,
    version: bytes = b"HTTP/1.1",
    rules: HeaderRules = RULES,
    client: str | None = "192.0.2.7",
) -> RequestHead:
    head = RequestHead(method, target, version, headers, client)
    rules.validate_request(head)
    return head


# -- requests: accepted ---------------------------------------------------------------

ACCEPT: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "plain GET",
        {"headers": [(b"Host", b"example.com"), (b"Accept", b"*/*")]},
        {"host": "example.com", "port": 80, "path": b"/p?q=1", "headers": [(b"Accept", b"*/*")]},
    ),
    (
        "Host spelled otherwise: case, trailing dot, default port",
        {"headers": [(b"Host", b"EXAMPLE.com.:80")]},
        {"authority": b"example.com", "headers": []},
    ),
    (
        "no Host at all (rebuilt from the URI)",
        {"headers": []},
        {"authority": b"example.com"},
    ),
    (
        "IPv6 literal",
        {
            "target": b"http://[2001:DB8::1]:8080/",
            "headers": [(b"Host", b"[2001:db8:0::1]:8080")],
        },
        {"host": "2001:db8::1", "port": 8080, "authority": b"[2001:DB8::1]:8080"},
    ),
    (
        "Content-Length with leading zeros: canonical",
        {"method": b"POST", "headers": [(b"Content-Length", b"007")]},
        {"length": 7, "headers": [(b"Content-Length", b"7")]},
    ),
    (
        "trailing OWS stripped (llhttp keeps it)",
        {"headers": [(b"X-A", b"v \t"), (b"X-B", b"a\tb")]},
        {"headers": [(b"X-A", b"v"), (b"X-B", b"a\tb")]},
    ),
    (
        "obs-text is fine",
        {"headers": [(b"X-Name", b"caf\xe9")]},
        {"headers": [(b"X-Name", b"caf\xe9")]},
    ),
    (
        "chunked, several fields form one list",
        {
            "method": b"POST",
            "headers": [(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b" Chunked")],
        },
        {"codings": b"gzip, chunked", "chunked": True, "headers": []},
    ),
    (
        "hop-by-hop and what Connection names go; Content-Length and Host stay framing",
        {
            "method": b"POST",
            "headers": [
                (b"Connection", b"close, X-Secret, Content-Length, Host"),
                (b"X-Secret", b"s"),
                (b"Keep-Alive", b"300"),
                (b"Proxy-Authorization", b"Basic dTpw"),
                (b"TE", b"trailers"),
                (b"Content-Length", b"3"),
                (b"Accept", b"*/*"),
            ],
        },
        {
            "close": True,
            "credentials": b"Basic dTpw",
            "length": 3,
            "headers": [(b"Content-Length", b"3"), (b"Accept", b"*/*")],
        },
    ),
    (
        "WebSocket keeps Upgrade",
        {
            "headers": [
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Key", b"k"),
            ]
        },
        {"websocket": True, "headers": [(b"Upgrade", b"websocket"), (b"Sec-WebSocket-Key", b"k")]},
    ),
    (
        "h2c upgrade is not kept",
        {"headers": [(b"Upgrade", b"h2c"), (b"Connection", b"Upgrade, HTTP2-Settings")]},
        {"websocket": False, "headers": []},
    ),
    (
        "HTTP/1.0: Expect dropped",
        {"version": b"HTTP/1.0", "headers": [(b"Expect", b"100-continue"), (b"X", b"y")]},
        {"headers": [(b"X", b"y")]},
    ),
    (
        "OPTIONS to the server",
        {"method": b"OPTIONS", "target": b"http://a:81", "headers": []},
        {"path": b"*", "port": 81},
    ),
    (
        "CONNECT: authority-form, Content-Length 0 is no content",
        {
            "method": b"CONNECT",
            "target": b"Example.org:443",
            "headers": [(b"Host", b"other:1"), (b"Content-Length", b"0")],
        },
        {"host": "example.org", "port": 443, "path": b"", "length": 0},
    ),
]


@pytest.mark.parametrize(("case", "given", "expected"), ACCEPT, ids=[a[0] for a in ACCEPT])
def test_requests_accepted(case: str, given: dict[str, Any], expected: dict[str, Any]) -> None:
    head = request(**given)
    for name, value in expected.items():
        assert getattr(head, name) == value, name


def test_str_headers_are_accepted() -> None:
    head = RequestHead("GET", "http://a/", "HTTP/1.1", [("Host", "a"), ("X", "é")])
    RULES.validate_request(head)
    assert head.headers == [(b"X", b"\xe9")]


# -- requests: refused ------------------------------------------------------------------

CL = b"Content-Length"
TE = b"Transfer-Encoding"


def hs(*fields: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"headers": list(fields)}


REJECT: list[tuple[str, dict[str, Any], int, str]] = [
    ("CL and TE", hs((CL, b"3"), (TE, b"chunked")), 400, "together"),
    ("TE and CL", hs((TE, b"chunked"), (CL, b"3")), 400, "together"),
    ("two CL, equal", hs((CL, b"3"), (CL, b"3")), 400, "more than one"),
    ("two CL, differing", hs((CL, b"3"), (CL, b"4")), 400, "more than one"),
    ("CL list", hs((CL, b"3, 3")), 400, "invalid Content-Length"),
    ("CL sign", hs((CL, b"+3")), 400, "invalid Content-Length"),
    ("CL negative", hs((CL, b"-1")), 400, "invalid Content-Length"),
    ("CL hex", hs((CL, b"0x10")), 400, "invalid Content-Length"),
    ("CL inner space", hs((CL, b"1 0")), 400, "invalid Content-Length"),
    ("CL empty", hs((CL, b"")), 400, "invalid Content-Length"),
    ("CL huge", hs((CL, b"9" * 19)), 400, "invalid Content-Length"),
    ("TE unknown", hs((TE, b"xchunked, chunked")), 501, "unknown transfer coding"),
    ("TE identity", hs((TE, b"identity, chunked")), 501, "unknown transfer coding"),
    ("TE repeated", hs((TE, b"chunked, chunked")), 400, "repeated"),
    ("TE repeated fields", hs((TE, b"chunked"), (TE, b"chunked")), 400, "repeated"),
    ("TE not last", hs((TE, b"chunked, gzip")), 400, "not the last"),
    ("TE no chunked", hs((TE, b"gzip")), 400, "must be chunked"),
    ("TE empty element", hs((TE, b",chunked")), 400, "empty element"),
    ("TE empty", hs((TE, b"")), 400, "empty element"),
    ("TE params", hs((TE, b"chunked;q=1")), 400, "invalid transfer coding"),
    ("TE in HTTP/1.0", {"version": b"HTTP/1.0", "headers": [(TE, b"chunked")]}, 400, "HTTP/1.0"),
    ("name with space", hs((b"Transfer-Encoding ", b"chunked")), 400, "invalid header name"),
    ("name with tab", hs((b"X\t", b"v")), 400, "invalid header name"),
    ("empty name", hs((b"", b"v")), 400, "invalid header name"),
    ("name non-ASCII", hs((b"X\xe9", b"v")), 400, "invalid header name"),
    ("name with colon", hs((b"X:Y", b"v")), 400, "invalid header name"),
    ("leading space name (fold)", hs((b" X", b"v")), 400, "obsolete line folding"),
    ("CR in value", hs((b"X", b"a\rb")), 400, "invalid character"),
    ("LF in value", hs((b"X", b"a\nb")), 400, "invalid character"),
    ("NUL in value", hs((b"X", b"a\x00b")), 400, "invalid character"),
    ("CTL in value", hs((b"X", b"a\x01b")), 400, "invalid character"),
    ("DEL in value", hs((b"X", b"a\x7f")), 400, "invalid character"),
    ("obs-fold in value", hs((b"X", b"a\r\n b")), 400, "obsolete line folding"),
    (
        "two Hosts",
        hs((b"Host", b"example.com"), (b"Host", b"example.com")),
        400,
        "more than one Host",
    ),
    ("Host mismatch", hs((b"Host", b"evil.example")), 400, "does not match"),
    ("Host port mismatch", hs((b"Host", b"example.com:81")), 400, "does not match"),
    ("Host with path", hs((b"Host", b"example.com/x")), 400, "invalid Host"),
    ("Host with userinfo", hs((b"Host", b"u@example.com")), 400, "invalid Host"),
    ("Host empty", hs((b"Host", b"")), 400, "invalid Host"),
    ("Host port 0", hs((b"Host", b"example.com:0")), 400, "invalid Host"),
    ("Host bad port", hs((b"Host", b"example.com:8o")), 400, "invalid Host"),
    ("method not allowed", {"method": b"PROPFIND"}, 501, "not allowed"),
    ("method not a token", {"method": b"G(T"}, 400, "invalid method"),
    ("HTTP/2.0", {"version": b"HTTP/2.0"}, 505, "not supported"),
    ("HTTP/0.9", {"version": b"HTTP/0.9"}, 505, "not supported"),
    ("bad version", {"version": b"HTTPS/1.1"}, 400, "invalid HTTP version"),
    ("origin-form", {"target": b"/p"}, 400, "forward proxy"),
    ("asterisk-form", {"target": b"*"}, 400, "asterisk-form"),
    ("https URI", {"target": b"https://a/"}, 501, "CONNECT"),
    ("ftp URI", {"target": b"ftp://a/"}, 501, "only http"),
    ("userinfo", {"target": b"http://u:p@a/"}, 400, "userinfo"),
    ("bad host", {"target": b"http://a_b_%/"}, 400, "request target"),
    ("numeric host", {"target": b"http://0x7f000001/"}, 400, "invalid host"),
    ("port 0", {"target": b"http://a:0/"}, 400, "invalid port"),
    ("space in URI", {"target": b"http://a/ b"}, 400, "invalid character"),
    (
        "CONNECT with body",
        {"method": b"CONNECT", "target": b"a:443", "headers": [(CL, b"5")]},
        400,
        "no content",
    ),
    (
        "CONNECT chunked",
        {"method": b"CONNECT", "target": b"a:443", "headers": [(TE, b"chunked")]},
        400,
        "no content",
    ),
    ("CONNECT bad authority", {"method": b"CONNECT", "target": b"a"}, 400, "authority"),
]


@pytest.mark.parametrize(("case", "given", "status", "reason"), REJECT, ids=[r[0] for r in REJECT])
def test_requests_refused(case: str, given: dict[str, Any], status: int, reason: str) -> None:
    given = {"headers": [], **given}
    with pytest.raises(ProtocolError) as info:
        request(**given)
    assert info.value.status == status
    assert reason in info.value.reason
    expected = (
        "http_request_denied" if status == 501 and "allowed" in reason else "http_request_error"
    )
    assert info.value.proxy_status == expected


def test_limits() -> None:
    rules = HeaderRules(max_headers=3, max_head=200, max_request_line=40)
    request([(b"A", b"1")] * 3, rules=rules)
    with pytest.raises(ProtocolError) as info:
        request([(b"A", b"1")] * 4, rules=rules)
    assert (info.value.status, info.value.reason) == (431, "too many header fields")
    with pytest.raises(ProtocolError) as info:
        request([(b"A", b"x" * 200)], rules=rules)
    assert (info.value.status, info.value.reason) == (431, "request head too large")
    with pytest.raises(ProtocolError) as info:
        request([], target=b"http://a/" + b"x" * 20, rules=rules)
    assert (info.value.status, info.value.reason) == (414, "request line too long")


def test_methods_are_configurable() -> None:
    rules = HeaderRules(methods=("GET", "PURGE"))
    request([], method=b"PURGE", rules=rules)
    for method in (b"POST", b"CONNECT"):
        with pytest.raises(ProtocolError) as info:
            request([], method=method, target=b"a:1" if method == b"CONNECT" else URL, rules=rules)
        assert info.value.status == 501


# -- responses ------------------------------------------------------------------------


def response(raw: bytes, status: int = 200, rules: HeaderRules = RULES) -> tuple[bytes, Any, bytes]:
    return rules.prepare_response(raw, status, True)


def test_responses_accepted() -> None:
    line, head, block = response(
        b"HTTP/1.0 200 OK\r\nContent-Length: 010\r\nConnection: keep-alive, X-A\r\n"
        b"X-A: 1\r\nKeep-Alive: 5\r\nServer: s \r\n\r\n"
    )
    assert line == b"HTTP/1.1 200 OK"
    assert (head.length, head.http10) == (10, True)
    assert block == b"Content-Length: 10\r\nServer: s\r\nVia: 1.0 proxytap\r\n"
    line, head, block = response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert (head.codings, head.chunked, head.length) == (b"gzip", False, -1)  # close-delimited
    line, head, block = response(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        101,
    )
    assert block == b"Upgrade: websocket\r\nVia: 1.1 proxytap\r\n"


RESPONSE_REJECT = [
    (b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n", "together"),
    (b"Content-Length: 1\r\nContent-Length: 1\r\n", "more than one"),
    (b"Content-Length: 1,1\r\n", "invalid Content-Length"),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "repeated"),
    (b"Transfer-Encoding: xchunked\r\n", "unknown"),
    (b"Transfer-Encoding: chunked, gzip\r\n", "not the last"),
    (b"X: a\x01b\r\n", "invalid character"),
    (b"Bad Name: a\r\n", "invalid header name"),
]


@pytest.mark.parametrize(("fields", "reason"), RESPONSE_REJECT)
def test_responses_refused(fields: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        response(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n")
    assert info.value.status == 502
    assert info.value.proxy_status == "http_protocol_error"
    assert reason in info.value.reason
    with pytest.raises(ProtocolError) as info:
        response(b"HTTP/2.0 200 OK\r\n\r\n")
    assert info.value.status == 502
    rules = HeaderRules(max_headers=2)
    with pytest.raises(ProtocolError) as info:
        response(b"HTTP/1.1 200 OK\r\nA: 1\r\nA: 1\r\nA: 1\r\n\r\n", rules=rules)
    assert info.value.proxy_status == "http_response_header_section_size"


# -- rewrite --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "client", "xff", "forwarded"),
    [
        ("on", "192.0.2.7", b"10.0.0.1, 192.0.2.7", b"for=10.0.0.1, for=192.0.2.7"),
        ("on", "2001:db8::7", b"10.0.0.1, 2001:db8::7", b'for=10.0.0.1, for="[2001:db8::7]"'),
        ("off", "192.0.2.7", b"10.0.0.1, unknown", b"for=10.0.0.1, for=unknown"),
        ("truncate", "192.0.2.7", b"192.0.2.7", b"for=192.0.2.7"),
        ("delete", "192.0.2.7", None, None),
    ],
)
def test_forwarded_for(mode: str, client: str, xff: bytes | None, forwarded: bytes | None) -> None:
    rules = HeaderRules(forwarded_for=mode, via="")
    head = request(
        [(b"X-Forwarded-For", b"10.0.0.1"), (b"A", b"1"), (b"Forwarded", b"for=10.0.0.1")],
        rules=rules,
        client=client,
    )
    rules.rewrite_request(head)
    assert head.get("x-forwarded-for") == xff
    assert head.get("Forwarded") == forwarded
    assert head.headers[0] == (b"A", b"1")
    assert len(head.get_all("X-Forwarded-For")) == (xff is not None)
    # no header from the client: added (or not) all the same
    head = request([], rules=rules, client=client)
    rules.rewrite_request(head)
    if mode == "delete":
        assert head.headers == []
    else:
        node = "unknown" if mode == "off" else client
        assert head.get("X-Forwarded-For") == node.encode()


def test_via_and_user_rules() -> None:
    http = HttpConfig(
        via="edge1",
        request_rules=(
            {"action": "remove", "name": "Cookie"},
            {"action": "set", "name": "User-Agent", "value": "proxytap"},
            {"action": "add", "name": "X-Extra", "value": "a"},
            {"action": "add", "name": "X-Extra", "value": "b"},
        ),
        response_rules=({"action": "set", "name": "X-Frame-Options", "value": "DENY"},),
    )
    rules = HeaderRules.from_config(http)
    head = request(
        [(b"cookie", b"a=1"), (b"User-Agent", b"curl"), (b"Cookie", b"b=2"), (b"X-Extra", b"0")],
        version=b"HTTP/1.0",
        rules=rules,
    )
    rules.rewrite_request(head)
    assert head.headers == [
        (b"X-Extra", b"0"),
        (b"User-Agent", b"proxytap"),
        (b"X-Extra", b"a"),
        (b"X-Extra", b"b"),
        (b"Via", b"1.0 edge1"),
    ]
    _, _, block = rules.prepare_response(
        b"HTTP/1.1 200 OK\r\nX-Frame-Options: ALLOW\r\n\r\n", 200, True
    )
    assert block == b"X-Frame-Options: DENY\r\nVia: 1.1 edge1\r\n"
    assert HeaderRules.from_config(HttpConfig(), proxy_name="px").via == b"px"
    off = HeaderRules.from_config(HttpConfig(via=""))
    head = request([], rules=off)
    off.rewrite_request(head)
    assert head.headers == []


@pytest.mark.parametrize(
    ("table", "problem"),
    [
        ({"action": "drop", "name": "X"}, "must be remove, add or set"),
        ({"action": "add", "name": "X Y", "value": "1"}, "a token"),
        ({"action": "add", "name": "Content-Length", "value": "1"}, "frames or routes"),
        ({"action": "set", "name": "transfer-encoding", "value": "chunked"}, "frames or routes"),
        ({"action": "remove", "name": "Host"}, "frames or routes"),
        ({"action": "set", "name": "Connection", "value": "close"}, "frames or routes"),
        ({"action": "add", "name": "X", "value": "a\r\nB: c"}, "no control characters"),
        ({"action": "add", "name": "X", "value": " a"}, "no control characters"),
        ({"action": "add", "name": "X"}, "needs a string value"),
        ({"action": "remove", "name": "X", "value": "1"}, "takes no value"),
        ({"action": "add", "name": "X", "value": "\u20ac"}, "latin-1"),
        ({"action": "add", "name": "X", "value": "1", "when": "x"}, "unknown key"),
    ],
)
def test_rule_config_errors(table: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        HeaderRule.from_config(table, "http.request_rules[0]")
    assert problem in info.value.problem
    assert info.value.key.startswith("http.request_rules[0]")


def test_http_config_errors() -> None:
    for cfg, key in (
        (HttpConfig(via="a b"), "http.via"),
        (HttpConfig(forwarded_for="transparent"), "http.forwarded_for"),
        (HttpConfig(methods=("GET", "BAD METHOD")), "http.methods[1]"),
        (
            HttpConfig(response_rules=({"action": "x", "name": "A"},)),
            "http.response_rules[0].action",
        ),
    ):
        with pytest.raises(ConfigError) as info:
            cfg.validate("http")
        assert info.value.key == key


# -- hypothesis -------------------------------------------------------------------------

FUZZ = settings(max_examples=500, deadline=None)
TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SPECIAL = [
    *(n.encode() for n in sorted(HOP_BY_HOP)),
    b"Content-Length",
    b"Host",
    b"Expect",
    b"X-Forwarded-For",
    b"Forwarded",
    b"Via",
    b"Cookie",
]
TOKENS = st.binary(min_size=1, max_size=10).map(lambda b: bytes(TCHAR[c % len(TCHAR)] for c in b))
NAMES = st.one_of(st.sampled_from(SPECIAL), TOKENS, TOKENS, st.binary(max_size=6))
VALUES = st.one_of(
    st.sampled_from(
        [b"", b"0", b"5", b"007", b"1, 1", b"chunked", b"gzip, chunked", b"chunked, chunked",
         b"close", b"keep-alive, X-A", b"upgrade", b"websocket", b"example.com", b"example.com:81",
         b"100-continue", b" padded \t", b"a\r\n b", b"\x00", b"caf\xe9"]
    ),
    st.binary(max_size=12).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F)),
    st.binary(max_size=12),
)  # fmt: skip
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=8)
METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"GET", b"PURGE", b"get"])
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0"])
MODES = st.sampled_from(["on", "off", "truncate", "delete"])
HOP = {n.encode() for n in HOP_BY_HOP}


def _clean(fields: H) -> None:
    for name, value in fields:
        assert name.lower() not in HOP, name
        assert name.lower() != b"host"
        assert not {0, 10, 13} & set(value), value
        assert name and all(c in TCHAR for c in name), name


@FUZZ
@given(
    method=METHODS,
    version=VERSIONS,
    headers=HEADERS,
    mode=MODES,
    client=st.sampled_from(["192.0.2.1", "::1", None]),
)
def test_fuzz_request_rules(
    method: bytes, version: bytes, headers: H, mode: str, client: str | None
) -> None:
    rules = HeaderRules(forwarded_for=mode)
    head = RequestHead(method, URL, version, headers, client)
    try:
        rules.validate_request(head)
    except ProtocolError as exc:
        assert 400 <= exc.status <= 505
        event(f"refused {exc.status}")
        return
    event("accepted")
    rules.rewrite_request(head)
    _clean(head.headers)
    assert head.get("Via") is not None
    # the output validates again, to the same framing, and a second pass changes nothing
    again_fields = list(head.headers)
    if head.codings:
        again_fields.append((b"Transfer-Encoding", head.codings))
    again = RequestHead(method, URL, version, again_fields, client)
    rules.validate_request(again)
    assert (again.length, again.codings, again.chunked) == (head.length, head.codings, head.chunked)
    assert again.headers == head.headers
    assert serialize(head.headers).count(b"\r\n") == len(head.headers)  # nothing injected


@FUZZ
@given(headers=HEADERS, status=st.sampled_from([101, 200, 204, 304, 404]))
def test_fuzz_response_rules(headers: H, status: int) -> None:
    rules = HeaderRules()
    head = ResponseHead(status, b"HTTP/1.1", headers)
    try:
        rules.validate_response(head)
    except ProtocolError as exc:
        assert exc.status == 502
        event("refused")
        return
    event("accepted")
    rules.rewrite_response(head)
    for name, value in head.headers:
        assert name.lower() not in HOP or (status == 101 and name.lower() == b"upgrade")
        assert not {0, 10, 13} & set(value)
    again = ResponseHead(status, b"HTTP/1.1", head.headers)
    rules.validate_response(again)
    assert again.length == head.length


@FUZZ
@given(
    head=st.binary(max_size=200)
    | st.lists(st.tuples(NAMES, VALUES), max_size=6).map(
        lambda fs: (
            b"HTTP/1.1 200 OK\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fs) + b"\r\n"
        )
    )
)
def test_fuzz_prepare_response_raw(head: bytes) -> None:
    """Any raw head: a result or a ProtocolError, nothing else escapes."""
    try:
        _, resp, block = HeaderRules().prepare_response(head, 200, True)
    except ProtocolError as exc:
        assert exc.status == 502
        return
    assert block.count(b"\r\n") == len(resp.headers)


SAFE_VALUES = st.binary(max_size=20).map(
    lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F).strip(b" \t")
)
END_TO_END = TOKENS.filter(lambda n: n.lower() not in HOP | {b"host", b"content-length", b"expect"})
SAFE_HEADERS = st.lists(
    st.tuples(st.one_of(END_TO_END, st.sampled_from(SPECIAL[:9])), SAFE_VALUES), max_size=12
).map(
    # the hop-by-hop ones with values that frame nothing
    lambda fs: [(n, b"x") if n.lower() in HOP else (n, v) for n, v in fs]
)


@FUZZ
@given(headers=SAFE_HEADERS, mode=MODES, client=st.sampled_from(["192.0.2.1", "::1", None]))
def test_fuzz_valid_heads_are_accepted_and_clean(headers: H, mode: str, client: str | None) -> None:
    """Valid syntax without framing fields: always accepted, hop-by-hop gone, order kept."""
    rules = HeaderRules(forwarded_for=mode)
    head = RequestHead(b"GET", URL, b"HTTP/1.1", headers, client)
    if any(n.lower() == b"transfer-encoding" for n, _ in headers):
        with pytest.raises(ProtocolError):
            rules.validate_request(head)
        return
    rules.validate_request(head)
    rules.rewrite_request(head)
    _clean(head.headers)
    connection = {
        t.strip().lower()
        for n, v in headers
        if n.lower() in (b"connection", b"proxy-connection")
        for t in v.split(b",")
    }
    forwarding = {b"x-forwarded-for", b"forwarded"}
    kept = [(n, v) for n, v in headers if n.lower() not in HOP | connection | forwarding]
    assert head.headers[-1] == (b"Via", b"1.1 proxytap")  # ours, last
    assert [f for f in head.headers[:-1] if f[0].lower() not in forwarding] == kept


# -- no parser differential: what the rules accept, llhttp frames the same way --------


class _Frames:
    def __init__(self) -> None:
        self.headers: H = []
        self.body = b""
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


TE_VALUES = st.lists(
    st.sampled_from([b"chunked", b"Chunked", b"gzip", b"x", b" ", b"\t", b","]),
    min_size=1,
    max_size=6,
).map(b"".join)


@FUZZ
@given(value=TE_VALUES, response=st.booleans())
def test_fuzz_transfer_encoding_agrees_with_llhttp(value: bytes, response: bool) -> None:
    """The forwarder frames with llhttp and rewrites with these rules: they must agree."""
    import httptools

    frames = _Frames()
    if response:
        parser: Any = httptools.HttpResponseParser(frames)
        start = b"HTTP/1.1 200 OK\r\n"
    else:
        parser = httptools.HttpRequestParser(frames)
        start = b"POST http://example.com/ HTTP/1.1\r\n"
    try:
        parser.feed_data(start + b"Transfer-Encoding: " + value + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    except httptools.HttpParserError:
        return  # llhttp refuses it: nothing is forwarded whatever the rules say
    if not frames.headers:
        return
    try:
        if response:
            head: Any = ResponseHead(200, b"HTTP/1.1", frames.headers)
            RULES.validate_response(head)
        else:
            head = RequestHead(b"POST", URL, b"HTTP/1.1", frames.headers)
            RULES.validate_request(head)
    except ProtocolError:
        return
    llhttp_chunked = frames.complete and frames.body == b"abc"
    assert head.chunked == llhttp_chunked, (value, head.codings)
