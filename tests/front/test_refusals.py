"""Refusals say what to change: the rule that refused and the setting that would allow it.

Over real sockets: the client's reply body (HTTP) and the log line (every
protocol) name the rule and the setting (``--allow-dest`` /
``access.allow_dest``, ``--connect-ports`` / ``access.connect_ports``, an
``[[access.rules]]`` name, ``access.clients``), never an address the proxy
resolved.
"""

from __future__ import annotations

import logging

import pytest

from proxytap.config import Config, ListenerConfig
from proxytap.policy.acl import AccessConfig
from tests.conftest import ProxyFactory, RunningProxy, exchange

LISTENERS = (
    ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),
    ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks"),
)
# the default-denied ranges in force, CONNECT to 443 only, one named deny rule
STRICT = AccessConfig(
    clients=("127.0.0.1/32",),
    connect_ports=(443,),
    rules=({"name": "no-blocked", "action": "deny", "domains": ["blocked.test"]},),
)
PORTS_TEXT = (
    "CONNECT to port 8080 is not allowed by rule connect-ports; "
    "allow the port with --connect-ports or access.connect_ports"
)
LOOPBACK_TEXT = (
    "the destination is in a range denied by default (rule default-deny:loopback); "
    "allow the range with --allow-dest or access.allow_dest"
)
RULE_TEXT = "the destination is denied by rule 'no-blocked' of [[access.rules]]"
ACL_TEXT = "the client address is not allowed by rule client-acl; allow it in access.clients"


@pytest.fixture
async def strict(start_proxy: ProxyFactory) -> RunningProxy:
    return await start_proxy(Config(listeners=LISTENERS, access=STRICT))  # type: ignore[no-any-return]


def body(reply: bytes) -> bytes:
    return reply.partition(b"\r\n\r\n")[2]


async def test_connect_port_refusal_names_the_port_and_setting(
    strict: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="proxytap.front"):
        got = await exchange(strict.http, b"CONNECT example.test:8080 HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert body(got) == PORTS_TEXT.encode() + b"\n"
    line = next(r.getMessage() for r in caplog.records if "connect-ports" in r.getMessage())
    assert line.endswith(
        f"-> example.test:8080 failed: http_request_denied (rule connect-ports): {PORTS_TEXT}"
    )


async def test_default_denied_range_names_the_setting_not_the_address(
    strict: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="proxytap.front"):
        # a name that resolves to loopback: the client must not learn where it points
        plain = await exchange(
            strict.http, b"GET http://localhost:9/ HTTP/1.1\r\nHost: localhost:9\r\n\r\n"
        )
        tunnel = await exchange(strict.http, b"CONNECT localhost:443 HTTP/1.1\r\n\r\n")
    for got in (plain, tunnel):
        assert got.startswith(b"HTTP/1.1 403 Forbidden\r\n"), got
        assert body(got) == LOOPBACK_TEXT.encode() + b"\n"
        assert b"127.0.0.1" not in got and b"::1" not in got
    lines = [r.getMessage() for r in caplog.records if LOOPBACK_TEXT in r.getMessage()]
    assert len(lines) == 2, lines
    # the log is for the operator: it has the resolved address
    assert any("-> localhost:9 connect failed" in x and "(127.0.0.1)" in x for x in lines)
    assert any("-> localhost:443 failed" in x for x in lines)


async def test_named_rule_refusal_over_http_and_socks(
    strict: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="proxytap.front"):
        got = await exchange(strict.http, b"CONNECT blocked.test:443 HTTP/1.1\r\n\r\n")
        # SOCKS5, no auth, CONNECT blocked.test:80 by name: reply 0x02 (not allowed)
        name = b"blocked.test"
        req = b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50"
        socks = await exchange(strict.socks, req)
        # SOCKS4a: rejected
        socks4 = await exchange(
            strict.socks, b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + name + b"\x00"
        )
    assert body(got) == RULE_TEXT.encode() + b"\n"
    assert socks == b"\x05\x00\x05\x02\x00\x01" + b"\x00" * 6
    assert socks4 == b"\x00\x5b" + b"\x00" * 6
    lines = [r.getMessage() for r in caplog.records if RULE_TEXT in r.getMessage()]
    assert [x.split(" ")[1] for x in lines] == ["http-connect", "socks5", "socks4a"], lines


async def test_client_acl_refusal_names_the_setting(
    strict: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="proxytap.front"):
        got = await exchange(strict.http, b"GET http://example.test/ HTTP/1.1\r\n\r\n", "127.0.0.2")
        socks = await exchange(
            strict.socks, b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50", "127.0.0.2"
        )
    assert body(got) == ACL_TEXT.encode() + b"\n"
    assert socks == b"\x05\x00\x05\x02\x00\x01" + b"\x00" * 6
    lines = [r.getMessage() for r in caplog.records if r.getMessage().endswith(ACL_TEXT)]
    assert len(lines) == 2 and all(x.startswith("client 127.0.0.2:") for x in lines), lines
