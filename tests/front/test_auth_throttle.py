"""Failed authentications are throttled per client address, on every path.

Real clients over 127.0.0.1 (and 127.0.0.2, another address) through the real
proxy; the oracles are the exact replies, /metrics, the log and the
authenticator's own check counters (a throttled attempt checks no password).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest

from proxytap.config import AdminConfig, Config, from_dict, load
from proxytap.errors import ConfigError
from proxytap.policy.auth import AuthConfig, FailureThrottle, basic_credentials
from tests.conftest import TEST_ACCESS, Origin, ProxyFactory, RunningProxy, exchange
from tests.test_metrics import LISTENERS, htpasswd, scrape, value

__all__ = ["htpasswd"]  # the fixture, used by name

GOOD = basic_credentials("alice", "s3cret").encode()
BAD = basic_credentials("alice", "wrong").encode()
TOO_MANY = b"too many failed authentications from this address: retry in 60 s\n"
THROTTLED = (
    b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\nProxy-Status: proxytap; error=http_request_denied\r\n"
    b"Retry-After: 60\r\nConnection: close\r\n\r\n%b" % (len(TOO_MANY), TOO_MANY)
)
SOCKS_GREETING = b"\x05\x01\x02"


def socks_userpass(user: bytes, password: bytes) -> bytes:
    return b"\x01" + bytes((len(user),)) + user + bytes((len(password),)) + password


async def test_failures_from_one_address_are_refused_unchecked(
    start_proxy: ProxyFactory,
    htpasswd: Path,
    origin: Origin,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = Config(
        listeners=LISTENERS,
        access=TEST_ACCESS,
        admin=AdminConfig("127.0.0.1:0"),
        auth=AuthConfig(htpasswd=str(htpasswd), max_failures=2, failure_window=60),
    )
    proxy: RunningProxy = await start_proxy(cfg)
    auth = proxy.app.services.auth
    assert auth is not None
    caplog.set_level(logging.INFO, "proxytap.front")
    get = (
        b"GET %b/hello HTTP/1.1\r\nProxy-Authorization: %%b\r\nConnection: close\r\n\r\n"
        % origin.url.encode()
    )
    for _ in range(2):  # two wrong passwords: 407, checked
        got = await exchange(proxy.http, get % BAD)
        assert got.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n"), got
    assert auth.failures == 2
    # now even the right password is refused, without a check: plain HTTP, CONNECT, SOCKS5
    assert await exchange(proxy.http, get % GOOD) == THROTTLED
    connect = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nProxy-Authorization: %b\r\n\r\n"
    assert await exchange(proxy.http, connect % (origin.port, GOOD)) == THROTTLED
    socks = SOCKS_GREETING + socks_userpass(b"alice", b"s3cret")
    assert await exchange(proxy.socks, socks) == b"\x05\x02\x01\x01"
    assert (auth.failures, auth.successes) == (2, 0)
    # another address is not concerned
    got = await exchange(proxy.http, get % GOOD, "127.0.0.2")
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"hello GET /hello"), got
    families = await scrape(proxy)
    name = "proxytap_downstream_auth_throttled"
    assert value(families, name, "_total", listener="http") == 2
    assert value(families, name, "_total", listener="socks") == 1
    # logged once for the window, not once per attempt
    lines = [r.getMessage() for r in caplog.records if "refused unchecked" in r.getMessage()]
    assert lines == [
        "client 127.0.0.1: 2 failed authentications within 60 s; "
        "its attempts are refused unchecked for 60 s"
    ]


def test_the_throttle_window_and_its_bound() -> None:
    throttle = FailureThrottle(limit=2, window=10.0, size=3)
    throttle.failed("a", 100.0)
    assert throttle.blocked("a", 101.0) is None  # one failure: not yet
    throttle.failed("a", 102.0)
    assert throttle.blocked("a", 103.0) == (7.0, True)  # first refusal: reported
    assert throttle.blocked("a", 104.0) == (6.0, False)
    assert throttle.blocked("a", 110.0) is None  # the window (from the first failure) is over
    assert len(throttle) == 0
    for address in ("b", "c", "d", "e"):  # capped: the least recently failed one goes
        throttle.failed(address, 200.0)
        throttle.failed(address, 200.0)
    assert len(throttle) == 3
    assert throttle.blocked("b", 201.0) is None
    assert throttle.blocked("e", 201.0) == (9.0, True)
    off = FailureThrottle(limit=0, window=10.0)
    for _ in range(100):
        off.failed("a", 1.0)
    assert off.blocked("a", 2.0) is None and len(off) == 0


@pytest.mark.parametrize(
    ("table", "key"),
    [({"max_failures": -1}, "auth.max_failures"), ({"failure_window": 0}, "auth.failure_window")],
)
def test_throttle_settings_are_checked(table: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"auth": table})
    assert info.value.key == key


def test_every_auth_key_is_documented_in_the_example() -> None:
    """The example's [auth] section names every key of the schema, with its default."""
    example = Path(__file__).parent.parent.parent / "deploy" / "proxytap.example.toml"
    section = example.read_text().split("\n[auth]\n", 1)[1].split("\n[", 1)[0]
    documented = set(re.findall(r"^#? ?(\w+) +=", section, re.M))
    assert documented == {f.name for f in dataclasses.fields(AuthConfig)}
    assert load(example).auth == AuthConfig()  # the values shown are the defaults
