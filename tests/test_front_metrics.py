"""The front's own series: policy denials, tunnel results, latency histograms.

Each test drives real clients over 127.0.0.1 through the real proxy and reads
/metrics over HTTP; the oracle is what the clients did and were answered.
"""

from __future__ import annotations

from python_socks import ProxyError, ProxyType
from python_socks.async_.asyncio import Proxy

from proxytap.config import AdminConfig, Config
from proxytap.policy.acl import AccessConfig
from tests.conftest import ProxyFactory, RunningProxy, exchange
from tests.test_metrics import LISTENERS, RecordingOrigin, lab, recording_origin, samples, scrape

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
