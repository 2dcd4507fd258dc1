"""Access control, authentication and the SNI check, end to end over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from python_socks import ProxyError, ProxyType
from python_socks.async_.asyncio import Proxy

from proxytap.config import Config, ListenerConfig, TlsCheckConfig
from proxytap.front.upstream import SockAddr, SocketConnector, SystemResolver
from proxytap.policy.acl import AccessConfig
from proxytap.policy.auth import AuthConfig
from tests.certs import Pki
from tests.conftest import (
    TEST_ACCESS,
    Origin,
    ProxyFactory,
    RawServer,
    RunningProxy,
    exchange,
    run,
    wait_until,
)

LISTENERS = (
    ListenerConfig(kind="http", address="127.0.0.1:0", name="http"),
    ListenerConfig(kind="socks", address="127.0.0.1:0", name="socks"),
    ListenerConfig(kind="mixed", address="127.0.0.1:0", name="mixed"),
)


class RecordingConnector(SocketConnector):
    def __init__(self) -> None:
        self.calls: list[SockAddr] = []

    async def connect(self, family: int, sockaddr: SockAddr) -> socket.socket:
        self.calls.append(sockaddr)
        return await super().connect(family, sockaddr)


class MapResolver(SystemResolver):
    """Resolves chosen names to chosen addresses (a DNS-rebinding stand-in)."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    async def resolve(self, host: str, port: int) -> list[Any]:
        if host in self.names:
            addr = self.names[host]
            if ":" in addr:
                return [(socket.AF_INET6, (addr, port, 0, 0))]
            return [(socket.AF_INET, (addr, port))]
        return await super().resolve(host, port)


def connect_req(target: str, extra: str = "") -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n".encode()


# -- open proxy -------------------------------------------------------------------------


async def test_client_not_in_allow_list_is_refused(start_proxy: ProxyFactory) -> None:
    access = dataclasses.replace(TEST_ACCESS, clients=("127.0.0.1/32",))
    proxy: RunningProxy = await start_proxy(Config(listeners=LISTENERS, access=access))
    got = await exchange(proxy.http, connect_req("127.0.0.1:443"), local="127.0.0.2")
    assert got.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"Proxy-Status: proxytap; error=http_request_denied\r\n" in got
    assert got.endswith(
        b"the client address is not allowed by rule client-acl; allow it in access.clients\n"
    )
    socks5 = b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x01\xbb"
    got = await exchange(proxy.socks, socks5, local="127.0.0.2")
    assert got == b"\x05\x00\x05\x02\x00\x01" + b"\x00" * 6
    socks4 = b"\x04\x01\x01\xbb\x7f\x00\x00\x01\x00"
    assert await exchange(proxy.socks, socks4, local="127.0.0.2") == b"\x00\x5b" + b"\x00" * 6
    # the allowed address is served by the same proxy
    got = await exchange(proxy.http, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", local="127.0.0.1")
    assert got.startswith(b"HTTP/1.1 400 ")
    assert proxy.app.services.refusals[("client-acl", "client address not allowed")] == 3


@pytest.mark.parametrize(
    ("target", "resolved"),
    [
        ("10.0.0.1", None),
        ("169.254.169.254", None),
        ("::1", None),
        ("rebind.test", "127.0.0.1"),
        ("rebind6.test", "::ffff:127.0.0.1"),
        ("0.0.0.0", None),
    ],
)
async def test_default_policy_denies_internal_destinations_without_connecting(
    start_proxy: ProxyFactory, target: str, resolved: str | None
) -> None:
    connector = RecordingConnector()
    resolver = MapResolver({target: resolved} if resolved else {})
    cfg = Config(listeners=LISTENERS, access=AccessConfig(connect_ports=("1-65535",)))
    proxy: RunningProxy = await start_proxy(cfg, resolver=resolver, connector=connector)
    authority = f"[{target}]:80" if ":" in target else f"{target}:80"
    got = await exchange(proxy.http, connect_req(authority))
    assert got.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"error=destination_ip_prohibited" in got
    if ":" in target:
        atyp_addr = b"\x04" + socket.inet_pton(socket.AF_INET6, target)
    elif resolved is None:
        atyp_addr = b"\x01" + socket.inet_aton(target)
    else:
        atyp_addr = b"\x03" + bytes([len(target)]) + target.encode()
    got = await exchange(proxy.socks, b"\x05\x01\x00\x05\x01\x00" + atyp_addr + b"\x00\x50")
    assert got == b"\x05\x00\x05\x02\x00\x01" + b"\x00" * 6
    assert connector.calls == []


async def test_connect_port_policy(start_proxy: ProxyFactory, raw_server: ProxyFactory) -> None:
    server: RawServer = await raw_server(lambda r, w: w.write(b"hi"))
    access = dataclasses.replace(TEST_ACCESS, connect_ports=(443,))
    proxy: RunningProxy = await start_proxy(Config(listeners=LISTENERS, access=access))
    got = await exchange(proxy.http, connect_req(f"127.0.0.1:{server.port}"))
    assert got.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert b"error=http_request_denied" in got
    # SOCKS carries its own protocols: the CONNECT port list does not apply
    sock = await Proxy(ProxyType.SOCKS5, *proxy.socks).connect("127.0.0.1", server.port)
    reader, writer = await asyncio.open_connection(sock=sock)
    assert await reader.read() == b"hi"
    writer.close()


async def test_destination_rules_first_match_wins(
    start_proxy: ProxyFactory, origin: Origin
) -> None:
    rules = (
        {"name": "no-localhost-name", "action": "deny", "domains": ["localhost"]},
        {"name": "rest", "action": "allow"},
    )
    access = dataclasses.replace(TEST_ACCESS, rules=rules)
    proxy: RunningProxy = await start_proxy(Config(listeners=LISTENERS, access=access))
    rc, body, _ = await run(
        "curl",
        "-sS",
        "--socks5-hostname",
        "{}:{}".format(*proxy.socks),
        f"http://127.0.0.1:{origin.port}/hello",
    )
    assert rc == 0 and body == b"hello GET /hello"
    rc, _, err = await run(
        "curl",
        "-sS",
        "--socks5-hostname",
        "{}:{}".format(*proxy.socks),
        f"http://localhost:{origin.port}/hello",
    )
    assert rc == 97, err  # curl: proxy handshake error
    assert err.rstrip().endswith(b"(2)"), err  # SOCKS5 reply 0x02: not allowed by ruleset


# -- authentication ----------------------------------------------------------------------


@pytest.fixture
def htpasswd(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    import subprocess

    subprocess.run(["htpasswd", "-bcB", str(path), "alice", "s3cret"], check=True)
    subprocess.run(["htpasswd", "-b5", str(path), "bob", "hunter2"], check=True)
    return path


@pytest.fixture
async def auth_proxy(start_proxy: ProxyFactory, htpasswd: Path) -> RunningProxy:
    cfg = Config(listeners=LISTENERS, access=TEST_ACCESS, auth=AuthConfig(htpasswd=str(htpasswd)))
    return await start_proxy(cfg)  # type: ignore[no-any-return]


async def test_curl_proxy_user_connect(
    auth_proxy: RunningProxy, tls_origin: Origin, pki: Pki
) -> None:
    base = ["curl", "-sS", "-x", auth_proxy.http_url, "--cacert", str(pki.ca_pem)]
    url = f"{tls_origin.url}/hello"
    rc, body, err = await run(*base, "--proxy-user", "alice:s3cret", url)
    assert rc == 0, err
    assert body == b"hello GET /hello"
    rc, body, err = await run(*base, "--proxy-user", "bob:hunter2", url)
    assert rc == 0, err
    rc, _, err = await run(*base, "--proxy-user", "alice:wrong", url)
    assert rc != 0 and b"407" in err
    rc, _, err = await run(*base, url)
    assert rc != 0 and b"407" in err
    got = await exchange(auth_proxy.http, connect_req("127.0.0.1:443"))
    assert got.startswith(b"HTTP/1.1 407 Proxy Authentication Required\r\n")
    assert b'Proxy-Authenticate: Basic realm="proxytap", charset="UTF-8"\r\n' in got
    refusals = auth_proxy.app.services.refusals
    assert refusals[("auth", "bad credentials")] == 1
    assert auth_proxy.app.services.auth is not None
    assert auth_proxy.app.services.auth.failures == 1


async def test_socks5_username_password(auth_proxy: RunningProxy, raw_server: ProxyFactory) -> None:
    async def welcome(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"welcome")
        # read what the client sent before closing, or the kernel answers it with an RST
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader.read(65536), 0.5)

    server: RawServer = await raw_server(welcome)
    good = Proxy(ProxyType.SOCKS5, *auth_proxy.socks, username="alice", password="s3cret")
    sock = await good.connect("127.0.0.1", server.port)
    reader, writer = await asyncio.open_connection(sock=sock)
    assert await reader.read() == b"welcome"
    writer.close()
    bad = Proxy(ProxyType.SOCKS5, *auth_proxy.socks, username="alice", password="nope")
    with pytest.raises(ProxyError):
        await bad.connect("127.0.0.1", server.port)
    anonymous = Proxy(ProxyType.SOCKS5, *auth_proxy.socks)
    with pytest.raises(ProxyError):
        await anonymous.connect("127.0.0.1", server.port)
    # SOCKS4 carries no password: refused while authentication is on
    socks4 = Proxy(ProxyType.SOCKS4, *auth_proxy.socks)
    with pytest.raises(ProxyError):
        await socks4.connect("127.0.0.1", server.port)
    assert auth_proxy.app.services.refusals[("auth", "bad credentials")] == 1
    rc, body, err = await run(
        "curl",
        "-sS",
        "--http0.9",
        "-x",
        "socks5h://alice:s3cret@{}:{}".format(*auth_proxy.socks),
        f"http://127.0.0.1:{server.port}/",
    )
    assert rc == 0, err
    assert body == b"welcome"


# -- SNI check ---------------------------------------------------------------------------


async def tls_through_connect(
    proxy: RunningProxy, target: str, server_hostname: str, pki: Pki
) -> bytes:
    reader, writer = await asyncio.open_connection(*proxy.http)
    writer.write(connect_req(target))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    ctx = pki.client_context()
    await writer.start_tls(ctx, server_hostname=server_hostname)
    writer.write(
        f"GET /hello HTTP/1.1\r\nHost: {server_hostname}\r\nConnection: close\r\n\r\n".encode()
    )
    data = await reader.read()
    writer.close()
    return data


@pytest.mark.parametrize("mode", ["allow", "log", "deny"])
async def test_sni_mismatch(
    start_proxy: ProxyFactory,
    tls_origin: Origin,
    pki: Pki,
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = Config(listeners=LISTENERS, access=TEST_ACCESS, tls=TlsCheckConfig(sni_mismatch=mode))
    proxy: RunningProxy = await start_proxy(cfg)
    caplog.set_level(logging.INFO, "proxytap")
    # matching name: always fine, SNI and ALPN recorded
    ok = await tls_through_connect(proxy, f"localhost:{tls_origin.port}", "localhost", pki)
    assert ok.endswith(b"hello GET /hello")
    # CONNECT says localhost, the ClientHello says origin.test
    target = f"localhost:{tls_origin.port}"
    if mode == "deny":
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await tls_through_connect(proxy, target, "origin.test", pki)
    else:
        got = await tls_through_connect(proxy, target, "origin.test", pki)
        assert got.endswith(b"hello GET /hello")
    await proxy.recorder.wait_destroyed(2)
    flows = proxy.recorder.flows()
    assert [f.sni for f in flows] == ["localhost", "origin.test"]
    warned = [r for r in caplog.records if "sni mismatch" in r.getMessage()]
    assert len(warned) == (0 if mode == "allow" else 1)
    assert proxy.app.services.refusals[("sni-mismatch", mode)] == 1
    if mode == "deny":
        # not one byte of the hello reached the origin side of the flow
        assert flows[1].bytes_up == 0


async def test_sni_deny_keeps_bytes_from_the_origin(
    start_proxy: ProxyFactory, raw_server: ProxyFactory, pki: Pki
) -> None:
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())

    server: RawServer = await raw_server(record)
    cfg = Config(listeners=LISTENERS, access=TEST_ACCESS, tls=TlsCheckConfig(sni_mismatch="deny"))
    proxy: RunningProxy = await start_proxy(cfg)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await tls_through_connect(proxy, f"localhost:{server.port}", "elsewhere.test", pki)
    await wait_until(lambda: received, what="the origin saw its connection end")
    assert received == [b""]
