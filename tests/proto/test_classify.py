"""SF-TAP classification: the default rules on real first bytes, ordering, config, fuzzing."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxytap.errors import ConfigError
from proxytap.proto.classify import (
    DEFAULT,
    DEFAULT_RULES,
    Classifier,
    Rule,
    interface_for,
    interfaces,
    rules_from_config,
)

# A TLS 1.2 record carrying a ClientHello (type 1) and the ServerHello (type 2) answer.
CLIENT_HELLO = bytes.fromhex("16030100a5010000a10303") + bytes(32) + b"\x00\x00\x02\x13\x01"
SERVER_HELLO = bytes.fromhex("160303005a0200005603 03".replace(" ", "")) + bytes(32)
HTTP_REQ = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"
HTTP_RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"

C = Classifier()


def name(rule: Rule | None) -> str | None:
    return None if rule is None else rule.name


def test_default_rules_are_the_spec_table() -> None:
    table = {(r.name, r.l4): r for r in DEFAULT_RULES}
    http_up = rb"^[-a-zA-Z]+ .+ HTTP/1\.(0\r?\n|1\r?\n([-a-zA-Z]+: .+\r?\n)+)"
    expected: dict[tuple[str, str], tuple[int, bytes | None, bytes | None]] = {
        ("http_proxy", "tcp"): (
            90,
            rb"^(CONNECT|connect) .+ HTTP/1\.(0\r?\n|1\r?\n([-a-zA-Z]+: .+\r?\n)+)",
            rb"^HTTP/1\.[01] 200 .+\r?\n",
        ),
        ("websocket", "tcp"): (
            90,
            rb"^GET .+ HTTP/1.1\r\n",
            rb"^HTTP/1.1 101 Switching Protocols\r\n",
        ),
        ("http", "tcp"): (100, http_up, rb"^HTTP/1\.[01] [1-9][0-9]{2} .+\r?\n"),
        ("ssl", "tcp"): (
            100,
            rb"^((\x16\x03[\x00-\x03]..\x01...(\x02\x00|\x03[\x00-\x03]))|(..\x01(\x02\x00|\x03[\x00-\x03])))",
            rb"^((\x16\x03[\x00-\x03]..\x02...(\x02\x00|\x03[\x00-\x03]))|(..\x02(\x02\x00|\x03[\x00-\x03])))",
        ),
        ("ssh", "tcp"): (100, rb"^SSH-[12]\.[0-9]+-.+\r\n", rb"^SSH-[12]\.[0-9]+-.+\r\n"),
        ("smtp", "tcp"): (100, rb"^(EH|HE)LO .+\r\n", rb"^220 .+\r\n"),
        ("ftp", "tcp"): (100, rb"^USER .+\r\n", rb"^220 .+\r\n"),
        ("irc", "tcp"): (100, rb"^(PASS .+\r\n)?USER .+\r\nNICK .+\r\n", rb"^:.+ [0-9]{3} .+\r\n"),
        ("http_client", "tcp"): (200, http_up, rb".*"),
        ("dns", "udp"): (200, None, None),
    }
    for k, (nice, up, down) in expected.items():
        rule = table.pop(k)
        assert rule.nice == nice, k
        assert (rule.up.pattern if rule.up else None) == up, k
        assert (rule.down.pattern if rule.down else None) == down, k
        for rx in (rule.up, rule.down):
            assert rx is None or rx.flags & re.DOTALL
    assert {r.ports for r in DEFAULT_RULES if r.name == "dns"} == {frozenset({53, 5353, 5355})}
    assert set(table) == {(DEFAULT, "tcp"), (DEFAULT, "udp")}


@pytest.mark.parametrize(
    ("up", "down", "expected"),
    [
        (HTTP_REQ, HTTP_RESP, "http"),
        (b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.0 404 Not Found\r\n", "http"),
        (
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            "http_proxy",
        ),
        (
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n",
            "websocket",
        ),
        (CLIENT_HELLO, SERVER_HELLO, "ssl"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", b"SSH-2.0-OpenSSH_9.6\r\n", "ssh"),
        (b"EHLO me\r\n", b"220 mx ESMTP\r\n", "smtp"),
        (b"USER bob\r\n", b"220 ftp ready\r\n", "ftp"),
        (b"PASS x\r\nUSER u 0 * :u\r\nNICK n\r\n", b":srv 001 n :hi\r\n", "irc"),
        (HTTP_REQ, b"\x00garbage", "http_client"),
        (b"\x00\x01", b"\x02\x03", None),  # undecided until final
    ],
)
def test_tcp_rules(up: bytes, down: bytes, expected: str | None) -> None:
    assert name(C.tcp(up, down, (50000, 80), False)) == expected


def test_nice_orders_rules() -> None:
    # a CONNECT request also matches http (nice 100); http_proxy (nice 90) wins
    up = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n"
    assert name(C.tcp(up, b"HTTP/1.1 200 OK\r\n", (1, 2), False)) == "http_proxy"
    # a 404 answer to CONNECT is not http_proxy
    assert name(C.tcp(up, b"HTTP/1.1 404 No\r\n", (1, 2), False)) == "http"


def test_not_final_needs_both_directions() -> None:
    assert C.tcp(HTTP_REQ, b"", (1, 80), False) is None
    assert C.tcp(b"", HTTP_RESP, (1, 80), False) is None


def test_final_evaluates_what_is_there() -> None:
    assert name(C.tcp(HTTP_REQ, b"", (1, 80), True)) == "http_client"  # down .* matches b""
    assert name(C.tcp(b"", b"", (1, 80), True)) == DEFAULT
    assert name(C.tcp(b"\x00", b"\x01", (1, 80), True)) == DEFAULT
    assert C.tcp(b"", b"", (1, 80), True) is C.tcp_default


def test_client_direction_matters() -> None:
    # the response in the client's direction is not HTTP
    assert name(C.tcp(HTTP_RESP, HTTP_REQ, (1, 80), True)) == DEFAULT


def test_udp() -> None:
    assert name(C.udp((40000, 53))) == "dns"
    assert name(C.udp((5353, 5353))) == "dns"
    assert name(C.udp((5355, 1))) == "dns"
    assert C.udp((40000, 54)) is C.udp_default
    assert C.udp_default.l4 == "udp"


def test_port_only_and_port_restricted_rules() -> None:
    rules = [
        Rule("pg", 50, ports=frozenset({5432})),
        Rule("web8080", 60, re.compile(rb"^GET"), re.compile(rb"^HTTP"), frozenset({8080})),
        *DEFAULT_RULES,
    ]
    c = Classifier(rules)
    assert name(c.tcp(b"x", b"y", (40000, 5432), False)) == "pg"
    assert name(c.tcp(b"x", b"y", (5432, 40000), False)) == "pg"
    assert c.tcp(b"", b"y", (40000, 5432), False) is None
    assert name(c.tcp(b"", b"", (40000, 5432), True)) == "pg"
    assert name(c.tcp(HTTP_REQ, HTTP_RESP, (40000, 8080), False)) == "web8080"
    assert name(c.tcp(HTTP_REQ, HTTP_RESP, (40000, 8081), False)) == "http"


def test_stable_order_for_equal_nice() -> None:
    a = Rule("a", 10, re.compile(rb"^x"), re.compile(rb"^y"))
    b = Rule("b", 10, re.compile(rb"^x"), re.compile(rb"^y"))
    assert name(Classifier([a, b]).tcp(b"x", b"y", (1, 2), False)) == "a"
    assert name(Classifier([b, a]).tcp(b"x", b"y", (1, 2), False)) == "b"


def test_rules_listing_has_defaults_once() -> None:
    names = [(r.name, r.l4) for r in C.rules]
    assert names.count((DEFAULT, "tcp")) == 1 and names.count((DEFAULT, "udp")) == 1
    assert len(names) == len(set(names))
    assert Classifier([]).rules == (C.tcp_default, C.udp_default)


def test_duplicate_rules_rejected() -> None:
    with pytest.raises(ConfigError):
        Classifier([Rule("x", ports=frozenset({1})), Rule("x", ports=frozenset({2}))])
    Classifier([Rule("x", ports=frozenset({1})), Rule("x", ports=frozenset({1}), l4="udp")])


def test_interface_for_balance() -> None:
    http = Rule("http", balance=4)
    assert interface_for(http, 4704) == "http0"
    assert interface_for(http, 7) == "http3"
    assert interfaces(http) == ["http0", "http1", "http2", "http3"]
    assert interface_for(Rule("http"), 7) == "http"
    assert interface_for(Rule("http", balance=1), 7) == "http"
    assert interfaces(Rule("http", balance=1)) == ["http"]


# -- configuration ----------------------------------------------------------------


def test_config_overrides_and_adds() -> None:
    rules = rules_from_config(
        [
            {"name": "http", "balance": 4},
            {"name": "pg", "port": [5432, "6000-6002"], "nice": 50},
            {"name": "dht", "l4": "udp", "up": r"^d.*1:y1:[eqr].*e$"},
            {"name": "bin", "up": r"^\x16\x03", "down": "^\xff"},
        ]
    )
    by = {(r.name, r.l4): r for r in rules}
    http = by[("http", "tcp")]
    assert http.balance == 4 and http.up is not None and http.nice == 100
    assert [r.name for r in rules].index("http") == 2  # kept in place
    assert by[("pg", "tcp")].ports == frozenset({5432, 6000, 6001, 6002})
    assert by[("bin", "tcp")].down is not None
    assert by[("bin", "tcp")].down.match(b"\xff")
    c = Classifier(rules)
    assert name(c.tcp(b"\x16\x03\x01", b"\xff", (1, 2), False)) == "bin"
    assert name(c.udp((1, 2), b"d1:ad2:id20:xe1:y1:qe")) == "dht"
    assert name(c.udp((1, 2), b"nope")) == DEFAULT


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"name": "x", "up": "("}, "export.rules[0].up"),
        ({"name": "x", "up": "^\u20ac"}, "export.rules[0].up"),
        ({"name": "x", "down": 5}, "export.rules[0].down"),
        ({"name": "x", "port": [70000]}, "export.rules[0].port"),
        ({"name": "x", "port": ["9-1"]}, "export.rules[0].port"),
        ({"name": "x", "port": ["a-b"]}, "export.rules[0].port"),
        ({"name": "x", "port": 53}, "export.rules[0].port"),
        ({"name": "x", "port": [1], "nice": "1"}, "export.rules[0].nice"),
        ({"name": "x", "port": [1], "balance": -1}, "export.rules[0].balance"),
        ({"name": "x", "port": [1], "balance": True}, "export.rules[0].balance"),
        ({"name": "x", "port": [1], "l4": "sctp"}, "export.rules[0].l4"),
        ({"name": "x", "l4": "udp", "down": "^x"}, "export.rules[0].down"),
        ({"name": "../x", "port": [1]}, "export.rules[0].name"),
        ({"name": "", "port": [1]}, "export.rules[0].name"),
        ({"port": [1]}, "export.rules[0].name"),
        ({"name": "x", "port": [1], "format": "binary"}, "export.rules[0].format"),
        ({"name": "x"}, "export.rules[0]"),
    ],
)
def test_config_errors(entry: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        rules_from_config([entry])
    assert info.value.key == key


# -- fuzzing ------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    st.binary(max_size=600),
    st.binary(max_size=600),
    st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
    st.booleans(),
)
def test_classification_never_raises(
    up: bytes, down: bytes, ports: tuple[int, int], final: bool
) -> None:
    rule = C.tcp(up, down, ports, final)
    if final:
        assert rule is not None
    if not final and (not up or not down):
        assert rule is None
    assert C.udp(ports, up).l4 == "udp"


@settings(max_examples=100)
@given(st.sampled_from([HTTP_REQ, CLIENT_HELLO, b"SSH-2.0-x\r\n"]), st.binary(max_size=200))
def test_prefix_then_garbage_still_classifies(up: bytes, tail: bytes) -> None:
    down = {HTTP_REQ: HTTP_RESP, CLIENT_HELLO: SERVER_HELLO}.get(up, b"SSH-2.0-y\r\n")
    assert C.tcp(up + tail, down + tail, (1, 2), False) is not None
