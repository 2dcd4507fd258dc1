"""The front's own series: policy denials, tunnel results, latency histograms.

Each test drives real clients over 127.0.0.1 through the real proxy and reads
/metrics over HTTP; the oracle is what the clients did and were answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from python_socks import ProxyError, ProxyType
from python_socks.async_.asyncio import Proxy

from proxytap.config import AdminConfig, Config
from proxytap.policy.acl import AccessConfig
from tests.conftest import (
    TEST_ACCESS,
    ProxyFactory,
    RunningProxy,
    closed_port,
    curl,
    exchange,
)
from tests.test_metrics import (
    LISTENERS,
    Labels,
    RecordingOrigin,
    lab,
    recording_origin,
    samples,
    scrape,
)

__all__ = ["recording_origin"]  # the fixture, used by name

DENY_RULES = ({"name": "no-blocked", "action": "deny", "domains": ["blocked.test"]},)


def strict_config() -> Config:
    """Default-denied ranges in force, CONNECT to 443 only, clients from 127.0.0.1 only."""
    access = AccessConfig(clients=("127.0.0.1/32",), connect_ports=(443,), rules=DENY_RULES)
    return Config(listeners=LISTENERS, access=access, admin=AdminConfig("127.0.0.1:0"))


async def socks5_fails(proxy: RunningProxy, host: str, port: int) -> str:
    try:
        await Proxy(ProxyType.SOCKS5, *proxy.socks).connect(host, port, timeout=5)
    except ProxyError as exc:
        return str(exc)
    raise AssertionError("the SOCKS5 connect was not refused")


async def test_policy_denials_counted_by_listener_and_rule(
    start_proxy: ProxyFactory, recording_origin: RecordingOrigin
) -> None:
    proxy: RunningProxy = await start_proxy(strict_config())
    port = recording_origin.port
    # CONNECT to a port outside connect_ports
    got = await exchange(proxy.http, f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    assert got.startswith(b"HTTP/1.1 403 "), got
    # CONNECT to an allowed port, a default-denied destination (loopback)
    got = await exchange(proxy.http, b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 403 "), got
    # plain HTTP to the loopback origin: default-denied too
    got = await exchange(proxy.http, f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n".encode())
    assert got.startswith(b"HTTP/1.1 403 "), got
    # SOCKS5 to a name a rule denies
    assert "not allowed" in (await socks5_fails(proxy, "blocked.test", 80)).lower()
    # a client address outside access.clients
    got = await exchange(proxy.http, b"CONNECT example.test:443 HTTP/1.1\r\n\r\n", "127.0.0.2")
    assert got.startswith(b"HTTP/1.1 403 "), got
    assert recording_origin.records == []

    m = await scrape(proxy)
    denied = samples(m, "proxytap_policy_denied", "_total")
    assert {k: v for k, v in denied.items() if v} == {
        lab(listener="http", rule="connect-ports"): 1,
        lab(listener="http", rule="default-deny:loopback"): 2,
        lab(listener="http", rule="client-acl"): 1,
        lab(listener="socks", rule="no-blocked"): 1,
    }
    # the known rules are there at 0 from the start: every listener, every deny rule
    for listener in ("http", "socks"):
        for rule in ("client-acl", "no-blocked", "default-deny:private", "default-deny:metadata"):
            assert lab(listener=listener, rule=rule) in denied
    assert lab(listener="http", rule="connect-ports") in denied
    assert lab(listener="socks", rule="connect-ports") not in denied  # SOCKS has no such rule
    # refusals by policy are not upstream connect errors
    errors = samples(m, "proxytap_upstream_connect_errors", "_total")
    assert set(errors.values()) == {0}, errors


def open_config() -> Config:
    """Loopback destinations allowed, every CONNECT port, one deny rule (blocked.test)."""
    access = dataclasses.replace(TEST_ACCESS, rules=DENY_RULES)
    return Config(listeners=LISTENERS, access=access, admin=AdminConfig("127.0.0.1:0"))


async def tunnel_get(proxy: RunningProxy, kind: ProxyType, port: int) -> bytes:
    """GET /hello through a SOCKS tunnel to the origin; the whole response."""
    sock = await Proxy(kind, *proxy.socks, rdns=False).connect("127.0.0.1", port, timeout=5)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: origin\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_tunnel_results_by_listener_protocol_and_result(
    start_proxy: ProxyFactory, recording_origin: RecordingOrigin
) -> None:
    proxy: RunningProxy = await start_proxy(open_config())
    port = recording_origin.port
    # CONNECT: 200, 403 (a rule), 502 (nothing listens), 400 (a broken request)
    reader, writer = await asyncio.open_connection(*proxy.http)
    writer.write(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    writer.close()
    got = await exchange(proxy.http, b"CONNECT blocked.test:443 HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 403 "), got
    got = await exchange(proxy.http, f"CONNECT 127.0.0.1:{closed_port()} HTTP/1.1\r\n\r\n".encode())
    assert got.startswith(b"HTTP/1.1 502 "), got
    got = await exchange(proxy.http, b"CONNECT nohost HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400 "), got
    # plain HTTP is not a tunnel: not counted here
    got = await exchange(proxy.http, f"GET http://127.0.0.1:{port}/ HTTP/1.0\r\n\r\n".encode())
    assert got.startswith(b"HTTP/1.1 200 "), got
    # SOCKS5: succeeded, not_allowed, connection_refused; SOCKS4: granted, rejected
    assert (await tunnel_get(proxy, ProxyType.SOCKS5, port)).endswith(b"hello")
    assert "not allowed" in (await socks5_fails(proxy, "blocked.test", 80)).lower()
    assert "refused" in (await socks5_fails(proxy, "127.0.0.1", closed_port())).lower()
    assert (await tunnel_get(proxy, ProxyType.SOCKS4, port)).endswith(b"hello")
    with pytest.raises(ProxyError):
        await Proxy(ProxyType.SOCKS4, *proxy.socks, rdns=False).connect(
            "127.0.0.1", closed_port(), timeout=5
        )

    m = await scrape(proxy)
    results = samples(m, "proxytap_downstream_tunnel_results", "_total")
    assert {k: v for k, v in results.items() if v} == {
        lab(listener="http", protocol="http-connect", result="200"): 1,
        lab(listener="http", protocol="http-connect", result="403"): 1,
        lab(listener="http", protocol="http-connect", result="502"): 1,
        lab(listener="http", protocol="http-connect", result="400"): 1,
        lab(listener="socks", protocol="socks5", result="succeeded"): 1,
        lab(listener="socks", protocol="socks5", result="not_allowed"): 1,
        lab(listener="socks", protocol="socks5", result="connection_refused"): 1,
        lab(listener="socks", protocol="socks4", result="granted"): 1,
        lab(listener="socks", protocol="socks4", result="rejected"): 1,
    }
    # known results are there at 0, for the protocols each listener speaks only
    assert results[lab(listener="http", protocol="http-connect", result="407")] == 0
    assert results[lab(listener="socks", protocol="socks4a", result="granted")] == 0
    assert not any(dict(k)["listener"] == "http" and dict(k)["protocol"] != "http-connect"
                   for k in results)  # fmt: skip


def histogram_counts(families: dict[str, Any], name: str) -> dict[Labels, float]:
    """``_count`` per label set, each checked against its +Inf bucket."""
    counts = samples(families, name, "_count")
    for key, count in counts.items():
        inf = dict(key) | {"le": "+Inf"}
        assert samples(families, name, "_bucket")[tuple(sorted(inf.items()))] == count
    return counts


async def test_latency_histograms_by_listener_and_class(
    start_proxy: ProxyFactory, recording_origin: RecordingOrigin
) -> None:
    proxy: RunningProxy = await start_proxy(open_config())
    port = recording_origin.port
    before = await scrape(proxy)
    name = "proxytap_downstream_http_request_duration_seconds"
    assert histogram_counts(before, name) == {
        lab(listener="http", method="GET"): 0,
        lab(listener="http", method="POST"): 0,
        lab(listener="http", method="other"): 0,
    }
    # plain HTTP: two GETs on one connection, a POST, a DELETE, a GET to a closed port (502)
    url = f"http://127.0.0.1:{port}/hello"
    rc, out, err = await curl("-x", proxy.http_url, "-w", "%{http_code}\n",
                              "-o", "/dev/null", url, "-o", "/dev/null", url)  # fmt: skip
    assert rc == 0 and out.split() == [b"200", b"200"], err
    for method in ("POST", "DELETE"):
        rc, out, err = await curl("-x", proxy.http_url, "-X", method, "-d", "x", "-o", "/dev/null",
                                  "-w", "%{http_code}", url)  # fmt: skip
        assert rc == 0 and out == b"200", err
    rc, out, err = await curl("-x", proxy.http_url, "-o", "/dev/null", "-w", "%{http_code}",
                              f"http://127.0.0.1:{closed_port()}/")  # fmt: skip
    assert out == b"502", err
    # tunnels: CONNECT, SOCKS5, SOCKS4 set up; a refused one is not a set-up
    rc, out, err = await curl("-p", "-x", proxy.http_url, url)
    assert rc == 0 and out == b"hello", err
    assert (await tunnel_get(proxy, ProxyType.SOCKS5, port)).endswith(b"hello")
    assert (await tunnel_get(proxy, ProxyType.SOCKS4, port)).endswith(b"hello")
    assert "not allowed" in (await socks5_fails(proxy, "blocked.test", 80)).lower()

    m = await scrape(proxy)
    assert histogram_counts(m, name) == {
        lab(listener="http", method="GET"): 3,
        lab(listener="http", method="POST"): 1,
        lab(listener="http", method="other"): 1,
    }
    setup = "proxytap_downstream_tunnel_setup_duration_seconds"
    assert histogram_counts(m, setup) == {
        lab(listener="http", protocol="http-connect"): 1,
        lab(listener="socks", protocol="socks4"): 1,
        lab(listener="socks", protocol="socks4a"): 0,
        lab(listener="socks", protocol="socks5"): 1,
    }
    # durations are real: positive sums, within the test's own run time
    for key in (lab(listener="http", method="GET"), lab(listener="socks", protocol="socks5")):
        family = name if "method" in dict(key) else setup
        total = samples(m, family, "_sum")[key]
        assert 0 < total < 60, total
